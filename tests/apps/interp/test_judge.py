"""The judge client against real HTTP servers on 127.0.0.1: caching, retries, errors, log-prob fallback,
the key, and requests in flight."""

from __future__ import annotations

import asyncio
import threading

import pytest

from apps.interp.fake_judge import FakeAnswer, constant, serve_fake_judge
from apps.interp.judge import Judge, JudgeConfig, JudgeRequest, JudgeUnavailableError
from tests.conftest import free_port

KEY = "sk-test-secret-7f3a9"


def config(url: str, tmp_path, **kw) -> JudgeConfig:
    return JudgeConfig(url=url, model="judge", cache_dir=tmp_path / "cache", backoff_s=0.0, **kw)


def requests(n: int) -> list[JudgeRequest]:
    return [JudgeRequest((("system", "rate"), ("user", f"question {i}"))) for i in range(n)]


def ask(judge: Judge, reqs: list[JudgeRequest]):
    return asyncio.run(judge.ask_many(reqs))


def test_rerun_is_answered_from_the_cache_and_traceable(tmp_path):
    with serve_fake_judge(constant("[[4]] [[fruit]]")) as server:
        first = ask(Judge(config(server.url, tmp_path)), requests(5))
        assert server.hits == 5
        again = Judge(config(server.url, tmp_path))
        second = ask(again, requests(5))
        assert server.hits == 5  # nothing sent on the rerun
    assert [r.cache_id for r in first] == [r.cache_id for r in second]
    assert all(r.from_cache for r in second) and not any(r.from_cache for r in first)
    assert again.stats.cache_hits == 5
    record = again.cached(first[0].cache_id)
    assert record["response"]["choices"][0]["message"]["content"] == "[[4]] [[fruit]]"
    assert record["request"]["messages"] == [["system", "rate"], ["user", "question 0"]]
    assert record["request"]["temperature"] == 0 and record["request"]["seed"] == 0


def test_another_seed_is_another_request(tmp_path):
    with serve_fake_judge(constant("[[4]]")) as server:
        judge = Judge(config(server.url, tmp_path))
        a = ask(judge, requests(1))
        b = ask(judge, [JudgeRequest(requests(1)[0].messages, seed=7)])
        assert server.hits == 2
        assert server.bodies[1]["seed"] == 7
    assert a[0].cache_id != b[0].cache_id


def test_key_is_sent_but_never_written(tmp_path, monkeypatch):
    monkeypatch.setenv("FAST_STEER_JUDGE_KEY", KEY)
    with serve_fake_judge(constant("[[4]]")) as server:
        judge = Judge(config(server.url, tmp_path))
        ask(judge, requests(3))
        assert server.headers_seen[0]["Authorization"] == f"Bearer {KEY}"
    settings = judge.config.settings()
    assert settings["key_from"] == "FAST_STEER_JUDGE_KEY" and KEY not in repr(settings)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) == 3
    assert all(KEY.encode() not in p.read_bytes() for p in files)


def test_server_errors_are_retried_then_answered(tmp_path):
    statuses = iter([500, 429, 200])

    def flaky(body):
        status = next(statuses)
        return FakeAnswer("[[5]]", status=status, retry_after=0 if status == 429 else None)

    with serve_fake_judge(flaky) as server:
        judge = Judge(config(server.url, tmp_path, retries=2))
        (reply,) = ask(judge, requests(1))
        assert server.hits == 3
    assert reply.text == "[[5]]"
    assert judge.stats.retries == 2


@pytest.mark.parametrize("status", [500, 429])
def test_persistent_server_errors_are_reported_after_the_retries(tmp_path, status):
    with serve_fake_judge(lambda body: FakeAnswer(status=status)) as server:
        judge = Judge(config(server.url, tmp_path, retries=2))
        with pytest.raises(JudgeUnavailableError) as err:
            ask(judge, requests(1))
        assert server.hits == 3
    message = str(err.value)
    assert f"{server.url}/v1/chat/completions" in message and f"HTTP {status}" in message
    assert "3 attempt(s)" in message
    assert not list(tmp_path.rglob("*.json"))  # nothing cached


def test_unreachable_judge_gives_one_clear_error(tmp_path):
    port = free_port()
    judge = Judge(config(f"http://127.0.0.1:{port}", tmp_path, retries=1))
    with pytest.raises(JudgeUnavailableError) as err:
        ask(judge, requests(4))
    message = str(err.value)
    assert f"http://127.0.0.1:{port}/v1/chat/completions" in message
    assert "ConnectError" in message and "2 attempt(s)" in message


def test_wrong_model_or_key_fails_at_once(tmp_path):
    with serve_fake_judge(lambda body: FakeAnswer(status=401)) as server:
        with pytest.raises(JudgeUnavailableError, match="HTTP 401"):
            ask(Judge(config(server.url, tmp_path, retries=3)), requests(1))
        assert server.hits == 1


def test_rejected_request_is_missing_not_fatal(tmp_path):
    with serve_fake_judge(lambda body: FakeAnswer(status=400)) as server:
        (reply,) = ask(Judge(config(server.url, tmp_path)), requests(1))
        assert server.hits == 1
    assert reply.text is None and "HTTP 400" in reply.error


def test_logprobs_refused_falls_back_and_is_remembered(tmp_path):
    with serve_fake_judge(constant("[[3]]"), accept_logprobs=False) as server:
        judge = Judge(config(server.url, tmp_path, concurrency=1))
        replies = ask(judge, requests(3))
        asked = [bool(b.get("logprobs")) for b in server.bodies]
    assert [r.text for r in replies] == ["[[3]]"] * 3
    assert asked == [True, False, False, False]  # one refusal, then asked without
    assert replies[0].logprobs is None and judge.logprobs_accepted is False


def test_logprobs_are_returned_where_accepted(tmp_path):
    answer = FakeAnswer("Score: [[4]]", digit_probs={"4": 0.75, "5": 0.25})
    with serve_fake_judge(lambda body: answer) as server:
        (reply,) = ask(Judge(config(server.url, tmp_path)), requests(1))
        assert server.bodies[0]["top_logprobs"] == 5
    assert "".join(t.token for t in reply.logprobs) == "Score: [[4]]"
    digit = next(t for t in reply.logprobs if t.token == "4")
    assert {tok for tok, _ in digit.top} == {"4", "5"}


def test_requests_in_flight_reach_the_concurrency_limit(tmp_path):
    barrier = threading.Barrier(4, timeout=60)

    def gathered(body):
        barrier.wait()  # answered only once 4 requests are in flight at the same time
        return FakeAnswer("[[2]]")

    with serve_fake_judge(gathered) as server:
        judge = Judge(config(server.url, tmp_path, concurrency=4))
        replies = ask(judge, requests(8))
        assert server.hits == 8
    stats = judge.stats.as_dict()
    assert [r.text for r in replies] == ["[[2]]"] * 8
    assert stats["peak_in_flight"] == 4
    assert 0 < stats["mean_in_flight"] <= 4 and stats["utilisation"] <= 1


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="http:// or https://"):
        JudgeConfig(url="127.0.0.1:8000", model="m", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="concurrency"):
        JudgeConfig(url="http://x", model="m", cache_dir=tmp_path, concurrency=0)


def test_endpoint_forms(tmp_path):
    def endpoint(url: str) -> str:
        return JudgeConfig(url=url, model="m", cache_dir=tmp_path).endpoint

    assert endpoint("http://h:1") == "http://h:1/v1/chat/completions"
    assert endpoint("https://api.example.com/v1/") == "https://api.example.com/v1/chat/completions"
    assert endpoint("http://h/v1/chat/completions") == "http://h/v1/chat/completions"
    public = JudgeConfig(url="http://user:pw@h:1/v1?key=s", model="m", cache_dir=tmp_path).public_endpoint
    assert public == "http://h:1/v1/chat/completions"
