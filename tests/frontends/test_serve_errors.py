"""`pipellm serve`'s answers to bad input: OpenAI's error body with the right status, and the
server still serving afterwards; /health while the model loads; engine failures."""

from __future__ import annotations

import json
import threading

import pytest
from starlette.testclient import TestClient

from pipellm_core.frontends.serve import create_app
from tests.frontends.serve_harness import settings_from_flags, wait_until

KEY = "sk-test-123"


@pytest.fixture(scope="module")
def api(tiny_models):
    flags = ["-m", tiny_models["llama"], "-np", "2", "-c", "64", "--temp", "0", "--alias", "tiny",
             "--api-key", KEY, "--api-key", "second-key"]
    app = create_app(settings_from_flags(flags))
    with TestClient(app, headers={"Authorization": f"Bearer {KEY}"}) as tc:
        state = app.state.serve
        wait_until(lambda: state.ready.is_set() or state.load_error is not None, 120, "the model to load", 0.05)
        assert state.load_error is None
        yield tc


def assert_error(response, status: int, code: str | None = None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code, error


def still_serving(tc):
    r = tc.post("/v1/completions", json={"model": "tiny", "prompt": "Hello", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("body", [b"{not json", b"", b"\xff\xfe", b"[1, 2", b"null", b"[]", b'"text"'])
def test_malformed_json_is_400(api, body):
    r = api.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert_error(r, 400)
    still_serving(api)


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"prompt": 5}, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "ten"}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": True}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, "top_p"),
    ("/v1/completions", {"prompt": "x", "stop": 3}, "stop"),
    ("/v1/completions", {"prompt": "x", "seed": 1.5}, "seed"),
    ("/v1/completions", {"prompt": "x", "seed": 2 ** 64}, "seed"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, "stream"),
    ("/v1/completions", {"prompt": "x", "n": 2}, "n"),
    ("/v1/completions", {"prompt": "x", "logprobs": 3}, "logprobs"),
    ("/v1/completions", {"prompt": ["a", "b"]}, "prompt"),
    ("/v1/completions", {"prompt": [1, 10**9]}, "prompt"),
    ("/v1/completions", {}, "prompt"),
    ("/v1/completions", {"prompt": "x", "model": 7}, "model"),
    ("/v1/chat/completions", {"messages": "hi"}, "messages"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content"),
])
def test_bad_fields_are_400(api, path, body, param):
    r = api.post(path, json=body)
    assert_error(r, 400)
    assert r.json()["error"]["param"] == param
    still_serving(api)


def test_prompt_longer_than_the_context_is_400(api):
    r = api.post("/v1/completions", json={"prompt": "word " * 200, "max_tokens": 4})
    assert_error(r, 400, "context_length_exceeded")
    r = api.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "word " * 200}]})
    assert_error(r, 400, "context_length_exceeded")
    r = api.post("/v1/completions", json={"prompt": "", "max_tokens": 4})
    assert_error(r, 400)
    still_serving(api)


def test_wrong_or_missing_key_is_401(api):
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic " + KEY}):
        assert_error(api.post("/v1/completions", json={"prompt": "x"}, headers=headers), 401, "invalid_api_key")
        assert_error(api.get("/v1/models", headers=headers), 401, "invalid_api_key")
    ok = api.post("/v1/completions", json={"prompt": "x", "max_tokens": 1},
                  headers={"Authorization": "Bearer second-key"})
    assert ok.status_code == 200
    assert api.get("/health", headers={"Authorization": ""}).status_code == 200  # open to probes


def test_unknown_model_is_404(api):
    assert_error(api.post("/v1/completions", json={"model": "gpt-9", "prompt": "x"}), 404, "model_not_found")
    assert_error(api.post("/v1/chat/completions",
                          json={"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}),
                 404, "model_not_found")


def test_unknown_route_and_method(api):
    assert_error(api.get("/v1/nothing"), 404)
    assert_error(api.get("/v1/completions"), 405)
    assert api.get("/metrics").status_code == 404  # only with --metrics


def test_unknown_fields_are_ignored_and_usage_is_in_every_answer(api):
    r = api.post("/v1/completions", json={"prompt": "x", "max_tokens": 3, "user": "u", "whatever": [1]})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    with api.stream("POST", "/v1/completions", json={"prompt": "x", "max_tokens": 3, "stream": True,
                                                      "stream_options": {"include_usage": True}}) as s:
        lines = [line for line in s.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") or line.startswith(":") for line in lines)
    events = [json.loads(line[6:]) for line in lines[:-1] if line.startswith("data: ")]
    assert events[-2]["choices"][0]["finish_reason"] == "length" and events[-2]["usage"]["completion_tokens"] == 3
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 3


def test_health_is_503_while_loading(tiny_models):
    settings = settings_from_flags(["-m", tiny_models["llama"], "-np", "1", "-c", "64"])
    release = threading.Event()
    load = settings.load
    settings.load = lambda: (release.wait(60), load())[1]
    app = create_app(settings)
    with TestClient(app) as tc:
        r = tc.get("/health")
        assert r.status_code == 503 and r.json() == {"status": "loading"}
        assert_error(tc.post("/v1/completions", json={"prompt": "x"}), 503, "model_loading")
        release.set()
        wait_until(lambda: app.state.serve.ready.is_set(), 60, "the model to load", 0.05)
        assert tc.get("/health").status_code == 200


def test_a_failing_load_is_reported(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    failures = []
    settings = settings_from_flags(["-m", str(bad)])
    settings.on_load_error = failures.append
    app = create_app(settings)
    with TestClient(app) as tc:
        wait_until(lambda: failures, 30, "the load to fail", 0.05)
        assert tc.get("/health").status_code == 500
        assert_error(tc.post("/v1/completions", json={"prompt": "x"}), 500, "model_load_failed")


def test_an_engine_failure_ends_only_its_requests(api):
    engine = api.app.state.serve.loop.batcher
    real = engine.decode_logits

    def broken(active):
        engine.decode_logits = real
        raise RuntimeError("injected failure")

    engine.decode_logits = broken
    r = api.post("/v1/completions", json={"prompt": "x", "max_tokens": 3})
    assert_error(r, 500, "generation_failed")
    still_serving(api)


def test_extreme_sampling_settings_are_served_beside_others(api):
    """Settings at the edges of their ranges (a temperature near zero, penalties that overflow)
    sample as they should, in the same steps as other requests, and fail none of them."""
    bodies = [{"prompt": "x", "max_tokens": 4, "temperature": 1e-45},
              {"prompt": "x", "max_tokens": 4, "temperature": 0.9, "repeat_penalty": 1e-30, "seed": 1},
              {"prompt": "x", "max_tokens": 4, "temperature": 0.9, "repeat_penalty": 1e30, "seed": 2},
              {"prompt": "x", "max_tokens": 4, "temperature": 0}]
    answers = [None] * len(bodies)

    def post(i):
        answers[i] = api.post("/v1/completions", json=bodies[i])
    threads = [threading.Thread(target=post, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in answers:
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 4
    # the temperature near zero is greedy
    assert answers[0].json()["choices"][0]["text"] == answers[3].json()["choices"][0]["text"]


def test_a_failing_sampler_ends_only_its_request(api, monkeypatch):
    from pipellm_core.runtime.sampling import Sampler
    real = Sampler.__call__

    def failing(self, logits, history):
        if self.params.seed == 13:
            raise RuntimeError("injected sampler failure")
        return real(self, logits, history)

    monkeypatch.setattr(Sampler, "__call__", failing)
    bad = {"prompt": "x", "max_tokens": 8, "temperature": 0.9, "seed": 13}
    good = {"prompt": "x", "max_tokens": 8, "temperature": 0.9, "seed": 14}
    answers = {}
    threads = [threading.Thread(target=lambda k=k, b=b: answers.update({k: api.post("/v1/completions", json=b)}))
               for k, b in (("bad", bad), ("good", good))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert_error(answers["bad"], 500, "generation_failed")
    assert answers["good"].status_code == 200 and answers["good"].json()["usage"]["completion_tokens"] == 8
