"""Auto-interpretability: a judge client for any OpenAI-compatible endpoint, the scoring protocols
(`fast_paper`, `detection` / `fuzzing`), their metrics, the controls that validate a judge, and `run_interp`,
which writes `interp.json` and `explanations.json`. The examples come from `train.interp`."""
