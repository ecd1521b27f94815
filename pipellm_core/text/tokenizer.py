"""Tokenization by llama.cpp's own vocabulary code on the same GGUF (loaded vocab-only), so
token ids are identical to llama.cpp's by construction rather than by reimplementation.

Text comes back from a table of every token's bytes, read from llama.cpp once, so decoding
costs no call into llama.cpp (which may live in a worker process).
"""

from __future__ import annotations

import codecs

from pipellm_core.errors import GGUFError
from pipellm_core.llamacpp.worker import open_session


class Tokenizer:
    def __init__(self, model_path: str, session=None):
        """`session`: an open llama.cpp session of the same file to reuse (else a vocab-only one)."""
        try:
            session = session or open_session(model_path, vocab_only=True)
            info = session.vocab_info()
        except Exception as e:
            raise GGUFError(f"llama.cpp could not read the vocabulary of {model_path}: {e}") from None
        self._session = session
        self.vocab_size = info["n_vocab"]
        self.bos_id, self.eos_id = info["bos"], info["eos"]
        self.add_bos = info["add_bos"] and self.bos_id >= 0
        self.chat_template = info["chat_template"]
        self._eog = frozenset(info["eog"])
        self._pieces = info["pieces"]

    def encode(self, text: str, add_bos: bool | None = None, special: bool = True) -> list[int]:
        """Token ids for `text`; BOS is added when the model's metadata asks for it."""
        bos = self.add_bos if add_bos is None else add_bos
        return self._session.tokenize(text.encode("utf-8"), bos, special)

    def token_bytes(self, ids: list[int]) -> bytes:
        out = b"".join(self._pieces[i] for i in ids)
        # as llama.cpp's detokenizer: no leading space right after BOS
        return out[1:] if ids and ids[0] == self.bos_id and out[:1] == b" " else out

    def decode(self, ids: list[int]) -> str:
        return self.token_bytes(ids).decode("utf-8", errors="replace")

    def is_end_of_generation(self, token: int) -> bool:
        return token in self._eog

    def token_text(self, token: int) -> str:
        return self.decode([token])


class StreamDecoder:
    """Turns tokens into text as they come, holding back bytes of an unfinished UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self._utf8.decode(self.tokenizer.token_bytes([token]))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
