"""lm-eval's own API model (`local-chat-completions`, an unmodified third-party client) against `fast-steer
serve`: local GSM8K generation items, once on a plain server and once on a server with a default spec."""

from __future__ import annotations

import json

import pytest
from lm_eval import simple_evaluate

from apps.evaluation.lm_eval.tasks import local_task_manager
from tests.apps.serve.helpers import MODEL, STRONG, client, serving, tiny_parts
from tests.conftest import EVAL_DATA

TASK = "gsm8k_local"


@pytest.fixture(scope="module")
def tiny(chatml_tokenizer, tmp_path_factory):
    return tiny_parts(chatml_tokenizer, tmp_path_factory.mktemp("serve_lm_eval"))


@pytest.fixture(scope="module")
def task_manager():
    with local_task_manager(EVAL_DATA, [TASK]) as manager:
        yield manager


def _run(server, task_manager) -> list[dict]:
    """lm-eval's samples of 3 GSM8K items, generated through the server's chat completions endpoint."""
    args = (
        f"model={MODEL},base_url={server.url}/chat/completions,tokenizer_backend=None,"
        "tokenized_requests=False,max_retries=1,timeout=60"
    )
    results = simple_evaluate(
        model="local-chat-completions",
        model_args=args,
        tasks=[TASK],
        limit=3,
        num_fewshot=0,
        task_manager=task_manager,
        apply_chat_template=True,
        gen_kwargs={"max_gen_toks": 8},
    )
    samples = {s["doc_id"]: s for s in results["samples"][TASK]}  # one per filter: the same responses
    return [samples[i] for i in sorted(samples)]


def _direct(server, sample: dict, steering=None) -> str:
    """The same request sent with the openai client (the messages lm-eval built, greedy, lm-eval's stops)."""
    (context,), gen_kwargs = sample["arguments"][0]
    messages = json.loads(context)
    extra = {} if steering is None else {"steering": steering}
    out = client(server).chat.completions.create(
        model=MODEL, messages=messages, max_tokens=8, temperature=0, stop=gen_kwargs["until"][:4],
        extra_body=extra or None,
    )  # fmt: skip
    return out.choices[0].message.content


def test_lm_eval_api_model_plain_and_default_spec(tiny, task_manager):
    with serving(*tiny) as plain_server:
        plain = _run(plain_server, task_manager)
        assert [s["resps"][0][0] for s in plain] == [_direct(plain_server, s) for s in plain]
    with serving(*tiny, default_steering=STRONG) as steered_server:
        steered = _run(steered_server, task_manager)
        assert [s["resps"][0][0] for s in steered] == [_direct(steered_server, s) for s in steered]
        assert [_direct(steered_server, s, STRONG) for s in steered] == [s["resps"][0][0] for s in steered]
    assert len(plain) == len(steered) == 3
    assert [s["resps"][0][0] for s in steered] != [s["resps"][0][0] for s in plain]
