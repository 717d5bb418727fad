"""`fast-steer serve --engine vllm` on SmolLM2 in float32 (integration), with the HF engine as the reference.

vLLM lives in its own environment (`.venv-vllm`, `make vllm-venv`, with the transformers it pins), so the
module's one vLLM server is a child process of that Python; the HF engine runs in this process on the same
model and SAE. The vLLM server prefills `CHUNK` tokens per step, so every chat prompt here is prefilled in
pieces, and keeps prefix caching on (its default; 128-token blocks on CPU).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import openai
import pytest
from click.testing import CliRunner

from apps.cli import main
from apps.serve.loading import load_named_saes
from apps.serve.process import serve_process, vllm_cpu_env, vllm_python
from apps.serve.server import BackgroundServer, make_service
from hub import sae_metadata, save_sae
from steer.errors import ConfigError
from steer.positions import resolve_special_tokens
from steer.spec import OPS, POSITION_MODES
from tests.conftest import read_conversations
from tests.steer.helpers import random_sae

pytestmark = pytest.mark.integration

LAYER = 15
D_SAE = 1152
NAME = "smol"  # the served model's and the SAE's name
CHUNK = 16  # --vllm-max-batched-tokens: tokens per vLLM step, so the prefill chunk
N_TOKENS = 16  # new tokens per reply; the logprobs of all of them are compared
TOLERANCE = 1e-3  # largest |logprob difference| between the engines allowed in float32
PROMPT = "Name three fruits."
EDITS = {  # strengths that change the reply to PROMPT at every position mode
    "add": [{"feature": 3, "op": "add", "strength": 300.0}],
    "scale": [{"feature": 3, "op": "scale", "strength": 5.0}],
    "set": [{"feature": 3, "op": "set", "strength": 50.0}],
    "ablate": [{"feature": k, "op": "ablate"} for k in range(64)],
}


@dataclass(frozen=True)
class Reply:
    """A greedy chat reply: its text, its tokens' logprobs and its `usage`."""

    text: str
    logprobs: tuple[float, ...]
    steered_positions: int | None
    prompt_tokens: int


@pytest.fixture(scope="module")
def sae_dir(default_model, tmp_path_factory):
    model, _ = default_model
    sae = random_sae(model.config.hidden_size, D_SAE, metadata=sae_metadata("default", LAYER))
    return save_sae(sae, tmp_path_factory.mktemp("vllm_serve") / NAME)


def vllm_env_python() -> str:
    """The Python of `.venv-vllm`; the test fails, never skips, without it (`make test` builds it)."""
    try:
        return vllm_python(None)
    except ConfigError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="module")
def vllm(sae_dir):
    """The base URL of `fast-steer serve --engine vllm`, run by the Python of `.venv-vllm`."""
    python = vllm_env_python()
    options = ("--served-model-name", NAME, "--engine", "vllm", "--dtype", "float32", "--sae",
               f"{NAME}={sae_dir}", "--vllm-max-batched-tokens", str(CHUNK))  # fmt: skip
    with serve_process(*options, python=python, env=vllm_cpu_env()) as base:
        yield base


@pytest.fixture(scope="module")
def hf(default_model, sae_dir):
    """The base URL of the HF engine on the same model and SAE."""
    model, tok = default_model
    saes = load_named_saes([f"{NAME}={sae_dir}"], model.device, model.config.hidden_size)
    with BackgroundServer(make_service(model, tok, saes, model_name=NAME)) as server:
        yield server.url.removesuffix("/v1")


def spec(op: str, positions: str) -> dict:
    return {"sae": NAME, "layer": LAYER, "edits": EDITS[op], "positions": positions}


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def post(base: str, path: str, body: dict) -> dict:
    response = httpx.post(base + path, json={"model": NAME, "temperature": 0, **body}, timeout=600)
    assert response.status_code == 200, response.text
    return response.json()


def chat(base: str, messages: list[dict], steering: dict | None = None) -> Reply:
    body = {"messages": messages, "max_tokens": N_TOKENS, "logprobs": True}
    data = post(base, "/v1/chat/completions", body | ({"steering": steering} if steering else {}))
    (choice,) = data["choices"]
    logprobs = tuple(e["logprob"] for e in choice["logprobs"]["content"])
    usage = data["usage"]
    return Reply(
        choice["message"]["content"], logprobs, usage.get("steered_positions"), usage["prompt_tokens"]
    )


def max_difference(ours: Reply, ref: Reply) -> float:
    """The largest |logprob difference| over the first N_TOKENS tokens (infinite if the texts differ)."""
    if ours.text != ref.text or len(ours.logprobs) != len(ref.logprobs):
        return float("inf")
    return max(abs(a - b) for a, b in zip(ours.logprobs[:N_TOKENS], ref.logprobs[:N_TOKENS], strict=True))


def assert_parity(ours: Reply, ref: Reply, what: str) -> None:
    assert (ours.text, ours.steered_positions) == (ref.text, ref.steered_positions), what
    assert max_difference(ours, ref) < TOLERANCE, what


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    return list(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    )


def long_chats(tokenizer, n: int, follow_up: str = "Summarise that in one sentence.") -> list[list[dict]]:
    """`n` chats of a shared conversation and a follow-up question, each 150 to 400 tokens: longer than one
    KV-cache block of 128 tokens, so their first block is kept in the prefix cache."""
    out = []
    for conversation in read_conversations(n=100):
        messages = [*conversation[:2], *user(follow_up)]
        if 150 <= len(prompt_ids(tokenizer, messages)) <= 400:
            out.append(messages)
            if len(out) == n:
                return out
    raise AssertionError(f"fewer than {n} shared conversations of 150 to 400 tokens")


def test_parity_with_hf_for_every_op_and_position(vllm, hf, record_property):
    """Every op at every position mode (vLLM rows batched, HF rows one at a time): the same greedy tokens and
    steered positions, and logprobs within TOLERANCE; the table of differences is printed and recorded."""
    cases = {"plain": None} | {f"{op}/{p}": spec(op, p) for op in OPS for p in POSITION_MODES}
    with ThreadPoolExecutor(8) as pool:
        ours = dict(zip(cases, pool.map(lambda s: chat(vllm, user(PROMPT), s), cases.values()), strict=True))
    ref = {name: chat(hf, user(PROMPT), s) for name, s in cases.items()}
    differences = {name: max_difference(ours[name], ref[name]) for name in cases}
    print(f"\nmax |logprob(vLLM) - logprob(HF)| over the first {N_TOKENS} tokens (float32):")
    for name, d in differences.items():
        print(f"  {name:18} {d:.2e}  steered={ours[name].steered_positions}  {ours[name].text!r}")
    record_property("logprob_max_abs_difference", json.dumps(differences))
    for name in cases:
        assert_parity(ours[name], ref[name], name)
    changed = [name for name in cases if ours[name].text != ours["plain"].text]
    assert len(changed) >= 3 * (len(cases) - 1) // 4, f"only {changed} change the reply"
    for op in OPS:  # the chunked prompt counted whole
        assert ours[f"{op}/prompt"].steered_positions == ours[f"{op}/prompt"].prompt_tokens


def test_long_prompt_marked_as_one_piece(vllm, hf, default_model):
    """A multi-turn prompt of many chunks in which a run of special positions (`<|im_start|>` and its role
    name) spans two chunks: vLLM marks what the HF engine marks in one forward."""
    _, tok = default_model
    special = resolve_special_tokens(tok)
    base = long_chats(tok, 3)[2]
    for n in range(CHUNK):
        messages = [*base[:2], *user("Summarise that" + " please" * n + ".")]
        ids = prompt_ids(tok, messages)
        marks = special.mask(ids).tolist()
        if any(marks[p - 1] and marks[p] for p in range(CHUNK, len(ids), CHUNK)):
            break
    else:
        raise AssertionError("no follow-up puts a special run across a chunk boundary")
    steering = spec("scale", "special")
    ours, ref = chat(vllm, messages, steering), chat(hf, messages, steering)
    assert ours.prompt_tokens == len(ids) > 100
    assert ours.steered_positions >= sum(marks)
    assert_parity(ours, ref, f"difference {max_difference(ours, ref):.2e}")


def test_plain_rows_of_a_mixed_batch_are_bit_identical(vllm):
    """`compare` rows run together: the plain rows equal those of the same batch with nothing steered, bit for
    bit (min_tokens == max_tokens keeps every row to the end, so both batches have the same shapes)."""
    prompts = ["The capital of France is", "Once upon a time, in a small village,"]
    body = {"max_tokens": 12, "min_tokens": 12, "logprobs": 0}
    steering = spec("add", "all")
    mixed = post(vllm, "/v1/completions", body | {"prompt": prompts, "steering": steering, "compare": True})
    plain = post(vllm, "/v1/completions", body | {"prompt": [p for p in prompts for _ in range(2)]})

    def rows(data: dict) -> list[tuple[str | None, str, list[float]]]:
        return [(c.get("label"), c["text"], c["logprobs"]["token_logprobs"]) for c in data["choices"]]

    labels = [label for label, _, _ in rows(mixed)]
    assert labels == ["steered", "plain"] * len(prompts)
    for (_, steered, _), (_, alone, _) in zip(rows(mixed)[::2], rows(plain)[::2], strict=True):
        assert steered != alone  # the batch was mixed
    assert [r[1:] for r in rows(mixed)[1::2]] == [r[1:] for r in rows(plain)[1::2]]


def test_prefix_cache_keeps_plain_and_steered_apart(vllm, hf, default_model):
    """On prompts longer than a cache block: plain after steered after plain, and steered after plain after
    steered, on the same prompt. Repeats equal the first bit for bit; the others equal the HF engine."""
    _, tok = default_model
    first, second = long_chats(tok, 2)
    steering = spec("scale", "special")

    plain, steered, plain_again = chat(vllm, first), chat(vllm, first, steering), chat(vllm, first)
    assert plain_again == plain
    assert_parity(steered, chat(hf, first, steering), "steered after plain")
    assert steered.text != plain.text

    steered, plain, steered_again = (
        chat(vllm, second, steering),
        chat(vllm, second),
        chat(vllm, second, steering),
    )
    assert steered_again == steered
    assert_parity(plain, chat(hf, second), "plain after steered")
    assert steered.text != plain.text


def test_openai_client_streaming_and_bad_specs(vllm):
    """The `openai` client: a steered reply, the same reply streamed (with usage), a plain one; bad specs get
    400; /v1/saes lists the SAE; /health reports no failed row."""
    client = openai.OpenAI(base_url=vllm + "/v1", api_key="unused", max_retries=0, timeout=300)
    kwargs = {"model": NAME, "messages": user(PROMPT), "max_tokens": 12, "temperature": 0}
    steering = {"steering": spec("set", "special")}
    reply = client.chat.completions.create(**kwargs, extra_body=steering)
    plain = client.chat.completions.create(**kwargs)
    chunks = list(
        client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}, extra_body=steering
        )
    )
    text = reply.choices[0].message.content
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert text != plain.choices[0].message.content
    steered_positions = reply.usage.model_extra["steered_positions"]
    assert chunks[-1].usage.model_extra["steered_positions"] == steered_positions > 0

    bad = [
        ({**spec("add", "special"), "sae": "nope"}, "must name an SAE"),
        ({**spec("add", "special"), "edits": [{"feature": D_SAE, "op": "add"}]}, "out of range"),
        ({**spec("add", "special"), "layer": 3}, "layer"),
    ]
    for steering, words in bad:
        with pytest.raises(openai.BadRequestError) as error:
            client.chat.completions.create(**kwargs, extra_body={"steering": steering})
        assert words in error.value.message

    (sae,) = httpx.get(vllm + "/v1/saes").json()["data"]
    assert (sae["id"], sae["layer"]) == (NAME, LAYER)
    health = httpx.get(vllm + "/health")
    assert health.status_code == 200
    assert health.json()["failed_rows"] == 0 and health.json()["steered_positions"] > 0


def test_device_map_refused_with_vllm():
    """`--device-map` is HF's placement: refused at once (vLLM is imported, never started)."""
    args = [vllm_env_python(), "-m", "apps", "serve", "--engine", "vllm", "--device-map", "auto"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stderr
    assert "--device-map is for --engine hf" in result.stderr


def test_vllm_engine_without_vllm_says_make_vllm_venv():
    assert importlib.util.find_spec("vllm") is None, "the main environment has vLLM: it should not"
    result = CliRunner().invoke(main, ["serve", "--engine", "vllm"])
    assert result.exit_code != 0 and "make vllm-venv" in result.output


REFUSALS = """
import json, sys, types
from vllm.engine.arg_utils import EngineArgs
from apps.serve.vllm_worker import refusal

def config(**kw):
    args = EngineArgs(model=sys.argv[1], dtype="float32", max_model_len=512, gpu_memory_utilization=0.1, **kw)
    return args.create_engine_config()

def runner(cfg, v1=True):  # what `refusal` reads of a model runner: its config, and the V1 batch's presence
    return types.SimpleNamespace(vllm_config=cfg, **({"input_batch": [], "query_start_loc": []} if v1 else {}))

eager = config(enforce_eager=True)
print(json.dumps({
    "eager": refusal(runner(eager)),
    "compiled": refusal(runner(config(enforce_eager=False))),
    "speculative": refusal(runner(config(enforce_eager=True, speculative_config={
        "method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 2}))),
    "no_v1_batch": refusal(runner(eager, v1=False)),
}))
"""


def test_worker_refuses_what_it_cannot_steer(default_model):
    """Real vLLM configurations: eager is accepted; compilation, speculative decoding and a runner without the
    V1 input batch are each refused with their reason (the worker's setup returns it, the server exits)."""
    folder = default_model.source
    result = subprocess.run([vllm_env_python(), "-c", REFUSALS, folder], capture_output=True, text=True,
                            timeout=600, env={**os.environ, **vllm_cpu_env()})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    why = json.loads(result.stdout.strip().splitlines()[-1])
    assert why["eager"] is None
    assert "enforce_eager" in why["compiled"]
    assert "speculative decoding" in why["speculative"]
    assert "V1 input batch" in why["no_v1_batch"]
