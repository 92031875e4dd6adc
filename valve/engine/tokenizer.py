"""A stand-in tokenizer (the weights are random, so no real vocabulary exists): UTF-8 bytes in, ``" t<id>"`` out."""

from __future__ import annotations


class ByteTokenizer:
    def __init__(self, vocab: int) -> None:
        self.vocab = vocab

    def encode(self, text: str) -> list[int]:
        return [b % self.vocab for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        return "".join(f" t{i}" for i in ids)
