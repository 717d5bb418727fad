"""A finished `interp run` through the real pipeline: a tiny Llama, a random JumpReLU SAE (tests.train), and a
scripted judge over real HTTP whose names hold characters HTML must escape (`<`, `&`, quotes)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from apps.interp.fake_judge import FakeAnswer, serve_fake_judge
from apps.interp.judge import JudgeConfig
from apps.interp.prompts import EXPLAIN_SYSTEM, RUBRIC_SYSTEM
from apps.interp.run import InterpConfig, run_interp
from hub.sae_io import save_sae
from tests.conftest import build_tiny_model, read_conversations
from tests.train.test_interp_collect import random_sae
from train.interp.collect import CollectConfig

JUDGE = "scripted-judge"
FEATURES = 6
_PEAK = re.compile(r"^(.*)\t10$", re.MULTILINE)


def scripted(body):
    """Rubric: score 4 and the name `peak <first peak token> & "co"`; explainer: one sentence; detection and
    fuzzing: 1 when the text holds a turn start."""
    system, user = body["messages"][0]["content"], body["messages"][1]["content"]
    if system == RUBRIC_SYSTEM:
        peak = _PEAK.search(user)
        name = f'peak {peak.group(1).strip() if peak else "?"} & "co"'
        return FakeAnswer(f"Score: [[4]] Name: [[{name}]]", digit_probs={"4": 0.6, "3": 0.4})
    if system == EXPLAIN_SYSTEM:
        return FakeAnswer("[[the start of a <turn> in a chat]]")
    return FakeAnswer("[[1]]" if "<|im_start|>" in user else "[[0]]")


def finished_run(root: Path, tokenizer) -> tuple[Path, Path]:
    """(SAE folder, run folder) of a run that scored FEATURES features with every protocol."""
    model = build_tiny_model("llama", len(tokenizer))
    conversations = read_conversations(n=30)
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations), encoding="utf-8")
    sae = save_sae(random_sae(model, tokenizer, conversations, 0), root / "sae")
    run = root / "run"
    with serve_fake_judge(scripted) as server:
        judge = JudgeConfig(url=server.url, model=JUDGE, cache_dir=run / "judge-cache", backoff_s=0.0)
        config = InterpConfig(
            sae=str(sae),
            data=[str(data)],
            out=run,
            judge=judge,
            protocol="all",
            features=FEATURES,
            collect=CollectConfig(instances=30, split="all", model="tiny-llama"),
        )
        run_interp(config, model=model, tokenizer=tokenizer)
    return sae, run
