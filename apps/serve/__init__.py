"""`fast-steer serve`: an OpenAI-compatible server that steers each request with its own SAE spec.

Modules, one job each: `schemas` (request bodies, limits), `steering` (named SAEs, the default spec,
request specs compiled), `sampling` (per-row token choice), `rows` (a row's tokens as text events),
`engine` (windowed static batching, one `generate` per batch), `responses` (OpenAI bodies and SSE chunks),
`auth` (bind rule, bearer key, body cap), `errors` (the OpenAI error shape), `app` (the FastAPI routes),
`loading` (`--sae` / `--spec`), `server` (uvicorn, foreground or in a background thread).
"""
