"""A tiny deterministic word-piece tokenizer for the pure tier (no CLIP vocabulary needed)."""
from __future__ import annotations

BOS, EOS = 1000, 1001


class FakeTokenizer:
    """Word pieces of at most 6 letters; trailing punctuation is its own token; ids by first appearance."""

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def _id(self, piece: str) -> int:
        return self.vocab.setdefault(piece, len(self.vocab) + 1)

    def __call__(self, word: str) -> list[int]:
        word = word.lower()
        tail = ""
        while word and not word[-1].isalnum():
            tail = word[-1] + tail
            word = word[:-1]
        ids = [self._id(word[i:i + 6] + ("</w>" if i + 6 >= len(word) else "")) for i in range(0, len(word), 6)]
        return ids + [self._id(c) for c in tail]
