"""Tokenization done by llama.cpp's own vocabulary code on the same GGUF (loaded vocab-only), so
token ids are identical to llama.cpp's by construction rather than by reimplementation."""

from __future__ import annotations

import codecs

from .errors import GGUFError


class Tokenizer:
    def __init__(self, model_path: str):
        import llama_cpp

        try:
            self._vocab = llama_cpp.Llama(model_path, vocab_only=True, verbose=False)
        except Exception as e:
            raise GGUFError(f"llama.cpp could not read the vocabulary of {model_path}: {e}") from None
        self.bos_id = self._vocab.token_bos()
        self.eos_id = self._vocab.token_eos()
        self.vocab_size = self._vocab.n_vocab()
        meta = self._vocab.metadata
        self.chat_template = meta.get("tokenizer.chat_template", "")
        self.add_bos = meta.get("tokenizer.ggml.add_bos_token", "true") == "true" and self.bos_id >= 0
        self._eog = {i for i in range(self.vocab_size) if llama_cpp.llama_vocab_is_eog(
            self._vocab._model.vocab, i)} if hasattr(llama_cpp, "llama_vocab_is_eog") else {self.eos_id}

    def encode(self, text: str, add_bos: bool | None = None, special: bool = True) -> list[int]:
        """Token ids for `text`; BOS is added when the model's metadata asks for it."""
        bos = self.add_bos if add_bos is None else add_bos
        return self._vocab.tokenize(text.encode("utf-8"), add_bos=bos, special=special)

    def token_bytes(self, ids: list[int]) -> bytes:
        return self._vocab.detokenize(ids)

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
