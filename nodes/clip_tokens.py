"""CLIP token helpers shared by the Prompt-to-Prompt and subject nodes (docs/methods.md §5, §7).

Word-level token alignment needs ComfyUI's own tokenisation: the SD tokenizer under a CLIP, a per-word
tokenizer that matches it, a check that a prompt is one plain 77-token chunk, and the encoding of several
token rows as one CONDITIONING batch.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .common import EditLabError


def sd_tokenizer(clip):
    """The SD tokenizer under ComfyUI's CLIP wrapper whose Hugging Face tokenizer the cond is built from
    (CLIP-L for SD1.x and SDXL, CLIP-H for SD2.x)."""
    tok = getattr(clip, "tokenizer", None)
    candidates = [getattr(tok, name, None) for name in ("clip_l", "clip_h", "clip_g")]
    candidates += [v for v in vars(tok).values()] if tok is not None else []
    for c in candidates:
        if c is not None and hasattr(c, "tokenizer") and hasattr(c, "start_token") and c.start_token is not None:
            return c
    raise EditLabError("this node needs a CLIP text encoder with a start token (SD1.x, SD2.x, SDXL "
                       "checkpoints); the connected CLIP has none")


def word_tokenizer(sd_tok) -> Callable[[str], list[int]]:
    """One whitespace word -> its token ids, exactly as ComfyUI tokenises text (no start/end tokens)."""
    hf = sd_tok.tokenizer
    start = getattr(sd_tok, "tokens_start", 1)
    end = -1 if getattr(sd_tok, "tokenizer_adds_end_token", True) else None

    def tokenize(word: str) -> list[int]:
        return [int(t) for t in hf(word)["input_ids"][start:end]]

    return tokenize


def plain_prompt_tokens(clip, sd_tok, prompt: str, spec_words) -> dict:
    """ComfyUI's own tokens for ``prompt``; refuses a second chunk, or tokens the word split cannot follow."""
    tokens = clip.tokenize(prompt)
    for chunks in tokens.values():
        if len(chunks) != 1:
            raise EditLabError(
                f"the prompt {prompt!r} needs {len(chunks)} CLIP chunks of 77 tokens; prompt-to-prompt maps "
                "attention over one chunk (75 tokens of text): shorten the prompt"
            )
    ours = [t for w in spec_words for t in w.tokens]
    key = next((k for k, chunks in tokens.items()
                if chunks and int(chunks[0][0][0]) == sd_tok.start_token), next(iter(tokens)))
    ids = [t[0] for t in tokens[key][0]]
    if any(not isinstance(t, (int, np.integer)) for t in ids) or \
            [int(t) for t in ids[1:1 + len(ours)]] != ours or int(ids[1 + len(ours)]) != sd_tok.end_token:
        raise EditLabError(
            f"the prompt {prompt!r} uses ComfyUI prompt syntax (weights like (word:1.2), escapes or "
            "embedding:names) that word alignment cannot follow; write it as plain text and use the "
            "'reweight_words' input to strengthen or weaken words"
        )
    return tokens


def encode_rows(clip, rows: list[dict]) -> list:
    """CONDITIONING with one batch row per token dict (each one 77-token chunk), pooled outputs stacked."""
    conds, extras = [], None
    for tokens in rows:
        out = clip.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
        conds.append(out.pop("cond"))
        if extras is None:
            extras = {k: [v] for k, v in out.items()}
        else:
            for k, v in out.items():
                extras.setdefault(k, []).append(v)
    shapes = {tuple(c.shape) for c in conds}
    if len(shapes) != 1:
        raise EditLabError(f"the prompts encode to different shapes {sorted(shapes)}; use one 77-token chunk each")
    info = {}
    for k, values in extras.items():
        if all(isinstance(v, torch.Tensor) and v.shape[:1] == (1,) for v in values):
            info[k] = torch.cat(values)
        else:
            info[k] = values[0]
    return [[torch.cat(conds), info]]
