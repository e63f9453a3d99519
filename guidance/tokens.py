"""Word <-> token alignment for prompt-to-prompt (docs/methods.md §5; Hertz et al. 2023, ``seq_aligner``).

Pure Python/torch: a prompt is split into whitespace words, each word is tokenised by a callable
(``tokenize(word) -> list[int]``, no start/end tokens), and the token positions of every word are
recorded in the 77-long CLIP sequence (position 0 is the start token). CLIP's BPE works on
whitespace-separated pieces, so the concatenation of the per-word tokens is the tokenisation of the
whole prompt; callers with a real tokenizer check that (``nodes/p2p.py`` does).

Maps, in the reference's conventions (columns of attention maps are token positions):
- :func:`replace_map` — word swap: ``M[src_pos, tgt_pos]``, so that ``A_tgt = A_src @ M``.
- :func:`refine_map` — added words: global alignment of the two token sequences (match +1,
  mismatch -1, gap 0); ``mapper[tgt_pos] = src_pos`` and ``alphas[tgt_pos] = 0`` for new tokens.
"""
from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..errors import EditLabError

MAX_TOKENS = 77
Tokenize = Callable[[str], list[int]]


@dataclass(frozen=True)
class Word:
    """One whitespace word of a prompt and its token positions ``[start, stop)`` in the CLIP sequence."""

    text: str
    tokens: tuple[int, ...]
    start: int

    @property
    def stop(self) -> int:
        return self.start + len(self.tokens)

    @property
    def positions(self) -> list[int]:
        return list(range(self.start, self.stop))

    @property
    def key(self) -> str:
        """The word as blend/reweight lookups compare it: lower case, surrounding punctuation stripped."""
        return normalise(self.text)


def normalise(word: str) -> str:
    return word.strip().strip(string.punctuation).lower()


def split_words(prompt: str, tokenize: Tokenize, max_tokens: int = MAX_TOKENS) -> list[Word]:
    """The prompt's words with their token positions (the start token sits at position 0)."""
    words: list[Word] = []
    pos = 1
    for text in prompt.split():
        ids = tuple(int(t) for t in tokenize(text))
        if not ids:
            continue
        words.append(Word(text, ids, pos))
        pos += len(ids)
    if pos + 1 > max_tokens:  # + the end token
        raise EditLabError(
            f"the prompt {prompt!r} is {pos - 1} tokens; prompt-to-prompt works on one {max_tokens}-token CLIP "
            f"chunk ({max_tokens - 2} tokens of text): shorten it"
        )
    return words


def token_ids(words: Sequence[Word], bos: int, eos: int) -> list[int]:
    """The prompt's token sequence with start and end tokens (no padding), as ``tokenizer.encode``."""
    return [bos, *[t for w in words for t in w.tokens], eos]


def find_words(words: Sequence[Word], query: str) -> list[int]:
    """Token positions of every occurrence of ``query`` (a word or a phrase of consecutive words)."""
    parts = [normalise(p) for p in query.split()]
    parts = [p for p in parts if p]
    if not parts:
        return []
    keys = [w.key for w in words]
    found: list[int] = []
    for i in range(len(words) - len(parts) + 1):
        if keys[i:i + len(parts)] == parts:
            for w in words[i:i + len(parts)]:
                found.extend(w.positions)
    return found


def replace_map(src: Sequence[Word], tgt: Sequence[Word], length: int = MAX_TOKENS) -> torch.Tensor:
    """Word-swap token map ``M`` (``length x length``) with ``A_tgt = A_src @ M``.

    Words are paired in order (the prompts must have the same number of words). A swapped word whose
    source and target token counts are equal maps token to token; otherwise every source token of the
    word spreads over the target tokens with weight ``1 / len(target tokens)`` (the reference). Unchanged
    words, the start token, the end token and the padding map one to one, following any offset that a
    multi-token swap introduced (the reference maps positions after the last swap to themselves, which
    misaligns the tail when a swap changes the token count).
    """
    if len(src) != len(tgt):
        raise EditLabError(
            f"source and target prompts differ in word count ({len(src)} vs {len(tgt)}); word swap (replace) "
            "needs equal counts — use refine to add or remove words"
        )
    m = torch.zeros(length, length)
    m[0, 0] = 1.0  # start token
    for ws, wt in zip(src, tgt):
        if ws.tokens == wt.tokens or len(ws.tokens) == len(wt.tokens):
            for i, j in zip(ws.positions, wt.positions):
                m[i, j] = 1.0
        else:
            for i in ws.positions:
                for j in wt.positions:
                    m[i, j] = 1.0 / len(wt.tokens)
    i = src[-1].stop if src else 1
    j = tgt[-1].stop if tgt else 1
    while i < length and j < length:  # end token and padding, in lockstep
        m[i, j] = 1.0
        i += 1
        j += 1
    return m


def global_align(x: Sequence[int], y: Sequence[int], gap: int = 0, match: int = 1,
                 mismatch: int = -1) -> list[tuple[int, int]]:
    """Needleman–Wunsch alignment of ``x`` (source) and ``y`` (target) as the reference scores it.

    Returns ``(j, i)`` for every target position ``j``: the aligned source position ``i``, or -1 for a
    target token with no source counterpart. Ties prefer a gap in the source, then a gap in the target,
    then the diagonal, and the trace-back walks from the end (the reference's order), so repeated words
    align the same way as the paper's code.
    """
    nx, ny = len(x), len(y)
    score = [[0] * (ny + 1) for _ in range(nx + 1)]
    trace = [[0] * (ny + 1) for _ in range(nx + 1)]
    for j in range(1, ny + 1):
        score[0][j] = j * gap
        trace[0][j] = 1
    for i in range(1, nx + 1):
        score[i][0] = i * gap
        trace[i][0] = 2
    for i in range(1, nx + 1):
        for j in range(1, ny + 1):
            left = score[i][j - 1] + gap
            up = score[i - 1][j] + gap
            diag = score[i - 1][j - 1] + (match if x[i - 1] == y[j - 1] else mismatch)
            best = max(left, up, diag)
            score[i][j] = best
            trace[i][j] = 1 if best == left else 2 if best == up else 3
    pairs: list[tuple[int, int]] = []
    i, j = nx, ny
    while i > 0 or j > 0:
        t = trace[i][j]
        if t == 3:
            i, j = i - 1, j - 1
            pairs.append((j, i))
        elif t == 1:
            j -= 1
            pairs.append((j, -1))
        else:
            i -= 1
    pairs.reverse()
    return pairs


def refine_map(src_ids: Sequence[int], tgt_ids: Sequence[int],
               length: int = MAX_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """Refine mapping (``mapper``, ``alphas``) from full token sequences (start and end tokens included).

    ``A_tgt_new[..., j] = A_src[..., mapper[j]] * alphas[j] + A_tgt[..., j] * (1 - alphas[j])``; padding
    positions after the target's end token map to themselves, as in the reference.
    """
    pairs = global_align(list(src_ids), list(tgt_ids))
    mapper = torch.arange(length, dtype=torch.long)
    alphas = torch.ones(length)
    for j, i in pairs:
        if j >= length:
            break
        mapper[j] = i if i >= 0 else length - 1  # the reference indexes -1 (any column: its alpha is 0)
        alphas[j] = 1.0 if i >= 0 else 0.0
    return mapper, alphas


def refine_matrix(mapper: torch.Tensor, length: int = MAX_TOKENS) -> torch.Tensor:
    """The refine gather as a matrix ``P`` with ``A_src[..., mapper] == A_src @ P``."""
    p = torch.zeros(length, length)
    p[mapper, torch.arange(length)] = 1.0
    return p
