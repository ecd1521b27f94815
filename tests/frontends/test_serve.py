"""`pipellm serve` on 127.0.0.1 with the real `openai` client: completions and chat, plain and
streaming, greedy answers equal to `pipellm run`'s, continuous batching under concurrency, the
wait queue, disconnects, metrics, a bounded load test, and the batch size over time on the sim."""

from __future__ import annotations

import io
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import redirect_stdout
from pathlib import Path

import openai
import pytest

from tests.frontends.serve_harness import get, post, running_server, settings_from_flags, wait_until

PROMPTS = ["The capital of France is", "Once upon a time", "def add(a, b):", "Red, green and",
           "My name is", "The sun rises in the", "1, 2, 3,", "Dear Sir,", "In the beginning",
           "import numpy as", "Roses are red", "The best way to", "Q: What is 2+2?\nA:",
           "Hello, world", "Water boils at", "Tomorrow I will"]


def client(base: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tiny(tiny_models) -> str:
    return tiny_models["llama"]


@pytest.fixture(scope="module")
def tiny_server(tiny):
    """4 slots, a wait queue of 64, greedy by default, metrics on."""
    with running_server(settings_from_flags(["-m", tiny, "-np", "4", "-c", "512", "--temp", "0",
                                             "--alias", "tiny", "--metrics"])) as server:
        yield server


def stream_text(c: openai.OpenAI, prompt: str, max_tokens: int) -> tuple[str, str, dict]:
    chunks = list(c.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, stream=True))
    return ("".join(ch.choices[0].text for ch in chunks), chunks[-1].choices[0].finish_reason,
            chunks[-1].usage.model_dump())


def test_completions_plain_and_streaming(tiny_server):
    base, _ = tiny_server
    c = client(base)
    plain = c.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=10)
    assert plain.object == "text_completion" and plain.model == "tiny"
    assert plain.choices[0].finish_reason == "length"
    assert plain.usage.completion_tokens == 10 and plain.usage.total_tokens == plain.usage.prompt_tokens + 10
    text, reason, usage = stream_text(c, PROMPTS[0], 10)
    assert text == plain.choices[0].text and reason == "length"
    assert usage == plain.usage.model_dump()


def test_chat_plain_and_streaming(tiny_server):
    base, _ = tiny_server
    c = client(base)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    plain = c.chat.completions.create(model="tiny", messages=messages, max_tokens=8)
    assert plain.object == "chat.completion" and plain.choices[0].message.role == "assistant"
    assert plain.usage.completion_tokens == 8
    chunks = list(c.chat.completions.create(model="tiny", messages=messages, max_tokens=8, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == plain.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage.total_tokens == plain.usage.total_tokens


def test_stop_strings_and_seeded_sampling(tiny_server):
    base, _ = tiny_server
    c = client(base)
    full = c.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=12).choices[0].text
    stop = full[4:7]
    cut = c.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=12, stop=[stop])
    assert cut.choices[0].text == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"
    sampled = [c.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=12, temperature=1.0,
                                    seed=5, extra_body={"top_k": 0, "min_p": 0.0}).choices[0].text
               for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_models_and_health(tiny_server):
    base, _ = tiny_server
    assert [m.id for m in client(base).models.list().data] == ["tiny"]
    status, _, body = get(base + "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"


def test_sixteen_concurrent_streams_equal_one_by_one(tiny_server):
    base, state = tiny_server
    c = client(base)
    alone = [stream_text(c, p, 12)[0] for p in PROMPTS]
    first_step = len(state.loop.steps)
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda p: stream_text(c, p, 12)[0], PROMPTS))
    assert together == alone
    steps = list(state.loop.steps)[first_step:]
    assert max(s.batch for s in steps if s.kind == "decode") == 4  # the 4 slots were all used


def test_a_disconnected_stream_frees_its_slot_and_the_queue_overflows_with_503(tiny):
    flags = ["-m", tiny, "-np", "1", "--queue-size", "1", "-c", "2048", "--temp", "0", "--alias", "tiny"]
    with running_server(settings_from_flags(flags)) as (base, state):
        c = client(base)
        long_stream = c.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=2000, stream=True)
        next(iter(long_stream))  # it holds the only slot now
        waiting = {}
        waiter = threading.Thread(target=lambda: waiting.update(
            out=c.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=6)))
        waiter.start()
        wait_until(lambda: state.loop.waiting == 1, 30, "the second request to wait")
        status, headers, body = post(base + "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2})
        assert status == 503 and headers["retry-after"] == "1"
        assert json.loads(body)["error"]["code"] == "server_busy"
        long_stream.close()  # the client goes away mid-stream
        waiter.join(60)
        assert waiting["out"].choices[0].finish_reason == "length"
        assert waiting["out"].choices[0].text == client(base).completions.create(
            model="tiny", prompt=PROMPTS[1], max_tokens=6).choices[0].text
        wait_until(lambda: state.loop.running == 0, 10, "the slots to empty")
        assert len(state.loop.steps) < 1500  # the 2000-token request stopped early


def test_metrics(tiny_server):
    base, _ = tiny_server
    client(base).completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=5)
    status, headers, body = get(base + "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in body.decode().splitlines()
              if line and not line.startswith("#")}
    for name in ("pipellm_requests_running", "pipellm_requests_waiting", "pipellm_decode_tokens_per_second"):
        assert name in values
    assert values["pipellm_prompt_tokens_total"] > 0 and values["pipellm_generated_tokens_total"] >= 5
    assert values["pipellm_decode_tokens_per_second"] > 0


def _rss_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_load_200_requests_16_at_a_time(tiny_server):
    base, state = tiny_server
    c = client(base)

    def one(i: int):
        if i % 2:
            return stream_text(c, PROMPTS[i % 16], 4)[1]
        return c.completions.create(model="tiny", prompt=PROMPTS[i % 16], max_tokens=4).choices[0].finish_reason

    one(0)
    after_first = _rss_mib()
    with ThreadPoolExecutor(16) as pool:
        reasons = list(pool.map(one, range(200)))
    assert reasons == ["length"] * 200
    assert state.loop.running == 0 and state.loop.waiting == 0
    assert _rss_mib() - after_first < 64, "memory grew with the requests served"


def test_greedy_answer_equals_pipellm_run(smollm2_path):
    """Completions and chat completions, greedy, give `pipellm run`'s text for the same prompts."""
    from pipellm_core.frontends.cli import main

    def run(*flags):
        out = io.StringIO()
        with redirect_stdout(out):
            assert main(["run", *flags, "-n", "6", "--temp", "0", "-c", "256", "--device", "cpu",
                         "--no-progress"]) == 0
        return out.getvalue()
    prompts = ["The capital of France is", "def add(a, b):", "Once upon a time"]
    question = "What is the capital of France?"
    expected = [run("-p", p) for p in prompts]
    expected_chat = run("--chat", "-p", question)
    name = Path(smollm2_path).name
    with running_server(settings_from_flags(["-np", "2", "-c", "256"])) as (base, _):
        c = client(base)
        for prompt, text in zip(prompts, expected):
            plain = c.completions.create(model=name, prompt=prompt, max_tokens=6, temperature=0)
            assert text == plain.choices[0].text + "\n"
        chat = c.chat.completions.create(model=name, messages=[{"role": "user", "content": question}],
                                         max_tokens=6, temperature=0)
        assert expected_chat == chat.choices[0].message.content + "\n"


def test_sim_batch_grows_and_shrinks(tiny):
    flags = ["-m", tiny, "-np", "4", "-c", "256", "--temp", "0", "--backend", "sim", "--alias", "tiny"]
    with running_server(settings_from_flags(flags)) as (base, state):
        c = client(base)
        lengths = [3, 6, 9, 12, 15, 18]  # six requests, four slots: the batch fills, then drains
        with ThreadPoolExecutor(6) as pool:
            list(pool.map(lambda n: c.completions.create(model="tiny", prompt=PROMPTS[n % 16], max_tokens=n), lengths))
        sizes = [s.batch for s in state.loop.steps if s.kind == "decode"]
        assert max(sizes) == 4 and sizes[-1] == 1
        last_full = len(sizes) - 1 - sizes[::-1].index(4)
        tail = sizes[last_full:]
        assert tail == sorted(tail, reverse=True) and set(tail) == {1, 2, 3, 4}  # requests leave one by one
        assert all(s.seconds > 0 for s in state.loop.steps)  # virtual time of the simulated GPU
        assert state.llm.backend.sim is not None


@pytest.mark.parametrize("plugin_flags", [
    ["--plugins", "graphs"],
    ["--plugins", "prefetch", "-O", "prefetch.resident_layers=2"],
    ["--plugins", "pipeline,graphs", "--sim-devices", "2"],
], ids=["graphs", "prefetch", "pipeline+graphs"])
def test_plugins_under_the_server_give_the_plain_answers(tiny, plugin_flags):
    """The plugins run under `serve` as under `run`: on the sim, concurrent greedy requests get
    the answers of the server without plugins."""
    base_flags = ["-m", tiny, "-np", "4", "-c", "256", "--temp", "0", "--backend", "sim", "--alias", "tiny"]
    lengths = [4, 7, 10, 13, 5]  # five requests, four slots: one waits, joins and leaves

    def answers(flags):
        with running_server(settings_from_flags(flags)) as (base, state):
            c = client(base)
            with ThreadPoolExecutor(5) as pool:
                out = list(pool.map(lambda i: c.completions.create(model="tiny", prompt=PROMPTS[i],
                                                                   max_tokens=lengths[i]).choices[0].text,
                                    range(len(lengths))))
            return out, state
    plain, _ = answers(base_flags)
    with_plugins, state = answers(base_flags + plugin_flags)
    assert with_plugins == plain
    pm = state.llm.backend.pm
    assert all(pm.get_plugin(name) is not None for name in plugin_flags[1].split(","))


def test_bad_input_through_the_real_server(tiny):
    """The bad inputs of test_serve_errors.py once more over HTTP, with the `openai` client where
    it can send them (a raw request for malformed JSON): each its status and OpenAI's error body,
    and the server keeps serving."""
    flags = ["-m", tiny, "-np", "2", "-c", "64", "--temp", "0", "--alias", "tiny", "--api-key", "sk-right"]
    with running_server(settings_from_flags(flags)) as (base, state):
        good = client(base, "sk-right")
        calls = [
            (client(base, "sk-wrong"), dict(model="tiny", prompt="x", max_tokens=2), openai.AuthenticationError, 401),
            (good, dict(model="no-such-model", prompt="x", max_tokens=2), openai.NotFoundError, 404),
            (good, dict(model="tiny", prompt="x", max_tokens=2, temperature=-1), openai.BadRequestError, 400),
            (good, dict(model="tiny", prompt="x " * 200, max_tokens=2), openai.BadRequestError, 400),
        ]
        for c, request, error, status in calls:
            with pytest.raises(error) as raised:
                c.completions.create(**request)
            assert raised.value.status_code == status
            body = raised.value.response.json()["error"]
            assert set(body) >= {"message", "type", "code"} and body["message"]
        status, _, raw = post(base + "/v1/completions", b"{not json", {"Authorization": "Bearer sk-right"})
        assert status == 400 and json.loads(raw)["error"]["message"]
        out = good.completions.create(model="tiny", prompt="Hello", max_tokens=3)
        assert out.usage.completion_tokens == 3
