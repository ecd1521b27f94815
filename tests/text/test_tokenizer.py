"""pipellm's tokenizer against llama-cpp-python's high-level `Llama` on a corpus."""

import llama_cpp
import pytest

from pipellm_core.text.tokenizer import StreamDecoder, Tokenizer

CORPUS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "naïve café, Zürich, São Paulo, Ελληνικά, русский, 日本語のテキスト, 한국어, עברית, العربية",
    "emoji: 🚀🔥👍🏽 and a family 👨‍👩‍👧",
    "def f(x):\n\treturn x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "    leading spaces, trailing spaces    ",
    "runs   of    whitespace\n\n\n\ttabs\t\tand\r\nwindows newlines",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|> in the middle <|endoftext|>",
    "numbers 1234567890 3.14159 -42 1e-9",
    "",
]


@pytest.fixture(scope="module")
def pair(smollm2_path):
    return Tokenizer(smollm2_path), llama_cpp.Llama(smollm2_path, vocab_only=True, verbose=False)


@pytest.mark.parametrize("text", CORPUS)
@pytest.mark.parametrize("special", [True, False])
def test_ids_match_llamacpp(pair, text, special):
    ours, ref = pair
    for bos in (True, False):
        assert ours.encode(text, add_bos=bos, special=special) == \
            ref.tokenize(text.encode(), add_bos=bos, special=special)


@pytest.mark.parametrize("text", CORPUS)
def test_text_round_trips_like_llamacpp(pair, text):
    ours, ref = pair
    ids = ref.tokenize(text.encode(), add_bos=False, special=False)
    assert ours.token_bytes(ids) == ref.detokenize(ids)
    assert ours.decode(ids) == text


def test_special_tokens_are_single_ids(pair):
    ours, _ = pair
    ids = ours.encode("<|im_start|>", add_bos=False, special=True)
    assert len(ids) == 1
    assert len(ours.encode("<|im_start|>", add_bos=False, special=False)) > 1


def test_bos_eos_follow_metadata(pair):
    ours, ref = pair
    assert (ours.bos_id, ours.eos_id) == (ref.token_bos(), ref.token_eos())
    assert ours.is_end_of_generation(ours.eos_id)
    assert not ours.is_end_of_generation(ours.encode("Hello", add_bos=False)[0])


def test_stream_decoder_holds_back_partial_characters(pair):
    ours, _ = pair
    text = "日本語 🚀"
    ids = ours.encode(text, add_bos=False)
    dec = StreamDecoder(ours)
    pieces = [dec.push(t) for t in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
