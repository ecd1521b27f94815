"""The Python API: OpenAI-shaped completions, streaming, chat, stop strings, batches."""

import pytest

from pipellm_core import LLM
from pipellm_core.errors import ChatTemplateError, PluginError


@pytest.fixture(scope="module")
def llm():
    return LLM(plugins=[], max_batch=4, n_ctx=512, progress=False)


def test_completion_shape(llm):
    out = llm.create_completion("The capital of France is", max_tokens=6, temperature=0)
    assert out["object"] == "text_completion"
    choice = out["choices"][0]
    assert "Paris" in choice["text"] and choice["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == 6
    assert out["usage"]["prompt_tokens"] == len(llm.tokenize("The capital of France is"))


def test_stream_concatenates_to_the_same_text(llm):
    whole = llm.create_completion("Once upon a time", max_tokens=10, temperature=0)["choices"][0]["text"]
    chunks = list(llm.create_completion("Once upon a time", max_tokens=10, temperature=0, stream=True))
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_stop_string_cuts_the_text(llm):
    full = llm.create_completion("The capital of France is", max_tokens=12, temperature=0)["choices"][0]["text"]
    stop = full[3:6]
    out = llm.create_completion("The capital of France is", max_tokens=12, temperature=0, stop=[stop])
    assert out["choices"][0]["text"] == full[:full.index(stop)]
    assert out["choices"][0]["finish_reason"] == "stop"


def test_batch_runs_every_prompt(llm):
    prompts = ["The capital of France is", "def add(a, b):", "Red, green and", "My name is",
               "The sun rises in the"]  # five prompts, four slots: one waits for a free slot
    out = llm.create_completion(prompts, max_tokens=8, temperature=0)
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3, 4]
    assert all(c["finish_reason"] == "length" for c in out["choices"])
    assert out["usage"]["completion_tokens"] == 40
    assert "Paris" in out["choices"][0]["text"]


def test_chat_completion(llm):
    out = llm.create_chat_completion([{"role": "user", "content": "What is the capital of France?"}],
                                     max_tokens=16, temperature=0)
    assert out["object"] == "chat.completion"
    msg = out["choices"][0]["message"]
    assert msg["role"] == "assistant" and msg["content"].strip()
    chunks = list(llm.create_chat_completion([{"role": "user", "content": "What is the capital of France?"}],
                                             max_tokens=16, temperature=0, stream=True))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == msg["content"]


def test_chat_prompt_uses_the_gguf_template(llm):
    tokens = llm.chat_prompt_tokens([{"role": "user", "content": "Hi"}])
    expected = llm.tokenize("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", add_bos=False)
    assert tokens[-len(expected):] == expected
    assert tokens[0] == llm.tokenize("<|im_start|>", add_bos=False)[0]  # a special token, not text


def test_seed_reproduces_and_differs(llm):
    a = llm.create_completion("Once upon a time", max_tokens=12, temperature=1.0, seed=5)
    b = llm.create_completion("Once upon a time", max_tokens=12, temperature=1.0, seed=5)
    c = llm.create_completion("Once upon a time", max_tokens=12, temperature=1.0, seed=6)
    assert a["choices"][0]["text"] == b["choices"][0]["text"] != c["choices"][0]["text"]


def test_llamacpp_backend_refuses_plugins():
    with pytest.raises(PluginError):
        LLM(backend="llamacpp", plugins=["graphs"])


def test_missing_chat_template(tiny_models):
    from pipellm_core.text.chat_template import render_chat
    with pytest.raises(ChatTemplateError, match="no chat template"):
        render_chat("", [{"role": "user", "content": "x"}])
