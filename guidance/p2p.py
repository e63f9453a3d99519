"""Prompt-to-Prompt attention control on plain tensors (docs/methods.md §5; Hertz et al., ICLR 2023).

The batch of one sampling run is ``[source, target_1, ..., target_n]``; inside a forward pass the rows
come in chunks of that size, one chunk per entry of ``cond_or_uncond`` (0 = conditional). Only the
target rows of conditional chunks are edited; the source row and every unconditional row run through
the host's attention kernel untouched.

Every cross-attention edit of the paper is linear in the columns (tokens) of the attention map::

    replace:   A' = A_src M                                  (M: token map, 1/len for multi-token words)
    refine:    A' = A_src P diag(a) + A_tgt diag(1 - a)      (P: alignment gather, a = 0 for new tokens)
    reweight:  A'' = A' diag(w)                              (on top of either; the reference's equalizer)
    schedule:  A_new = A'' diag(alpha) + A_tgt diag(1 - alpha)    (alpha_j = 1 while step < cross_replace_j)

so ``A_new = A_src S + A_tgt diag(T)`` with ``S = Base diag(a w alpha)`` and
``T = (1 - a) w alpha + 1 - alpha``, and the output ``A_new V_tgt`` is
``attn(q_src, k_src, S V_tgt) + attn(q_tgt, k_tgt, T * V_tgt)``: two calls of the *fused* kernel, and
one when ``T = 0`` (a word swap inside its window: the target row simply attends with the source's
queries and keys). Self-attention replacement (``A_tgt = A_src`` at small resolutions) is
``attn(q_src, k_src, v_tgt)``. No attention probabilities are materialised for editing; they are only
computed, on the conditional rows, at the one resolution where local blend and the attention-map viewer
read them.
"""
from __future__ import annotations

import hashlib
import math
import string
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from ..errors import EditLabError
from .tokens import (
    MAX_TOKENS,
    Tokenize,
    Word,
    find_words,
    normalise,
    refine_map,
    refine_matrix,
    replace_map,
    split_words,
    token_ids,
)

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
MODES = ("replace", "refine", "reweight")


def basic_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v on ComfyUI's layout ``[batch, tokens, heads * dim_head]``."""
    b, n, hd = q.shape
    d = hd // heads
    qh, kh, vh = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    probs = torch.softmax((qh @ kh.transpose(-1, -2)).float() / math.sqrt(d), dim=-1).to(v.dtype)
    return (probs @ vh).transpose(1, 2).reshape(b, n, hd)


def attention_probs(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """The attention probabilities ``[batch, heads, queries, keys]`` (float32)."""
    b, n, hd = q.shape
    d = hd // heads
    qh = q.reshape(b, n, heads, d).transpose(1, 2).float()
    kh = k.reshape(b, -1, heads, d).transpose(1, 2).float()
    return torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1)


# -- the edit spec --------------------------------------------------------------------------------

@dataclass
class EditSpec:
    """Token maps of one prompt-to-prompt edit: prompts ``[source, target_1, ...]``.

    ``base[t]``: ``length x length`` map from source token columns to target token columns (replace's M,
    refine's gather P, the identity for reweight); ``keep[t]``: refine's alphas (1 = column comes from the
    source); ``weights[t]``: reweight factors; ``replace_until[t]``: per-token cross-replace fraction
    (NaN = the controller's default); ``blend[row]``: 1 on the tokens of the local-blend words of that row.
    """

    prompts: list[str]
    words: list[list[Word]]
    mode: str
    base: torch.Tensor
    keep: torch.Tensor
    weights: torch.Tensor
    replace_until: torch.Tensor
    blend: torch.Tensor
    length: int = MAX_TOKENS

    @property
    def rows(self) -> int:
        return len(self.prompts)

    @property
    def targets(self) -> int:
        return len(self.prompts) - 1

    @property
    def has_blend(self) -> bool:
        return bool(self.blend.sum() > 0)

    def labels(self, row: int) -> list[tuple[str, list[int]]]:
        """(word, token positions) of a row, start and end tokens included: what each map column shows."""
        words = self.words[row]
        end = words[-1].stop if words else 1
        return [("<start>", [0])] + [(w.text, w.positions) for w in words] + [("<end>", [end])]

    def describe(self) -> str:
        lines = [f"mode {self.mode}, {self.targets} target(s)", f"source: {self.prompts[0]}"]
        lines += [f"target {i}: {p}" for i, p in enumerate(self.prompts[1:], 1)]
        return "\n".join(lines)


def parse_word_values(text: str, default: Optional[float], what: str) -> list[tuple[str, float]]:
    """``"cat, red car:0.5"`` -> [("cat", default), ("red car", 0.5)] (comma-separated, ``word:value``)."""
    out: list[tuple[str, float]] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        word, sep, value = item.rpartition(":")
        if not sep:
            word, value = item, ""
        word = word.strip()
        if value.strip() == "":
            if default is None:
                raise EditLabError(f"{what}: {item!r} needs a value, written word:value (e.g. cat:0.4)")
            out.append((word, float(default)))
            continue
        try:
            out.append((word, float(value)))
        except ValueError:
            raise EditLabError(f"{what}: cannot read the value of {item!r}; write word:number, e.g. cat:2") from None
    return out


def build_edit_spec(
    prompts: Sequence[str],
    mode: str,
    tokenize: Tokenize,
    *,
    bos: int,
    eos: int,
    reweight: Sequence[tuple[str, float]] = (),
    blend_words: Sequence[str] = (),
    replace_overrides: Sequence[tuple[str, float]] = (),
    length: int = MAX_TOKENS,
) -> EditSpec:
    """Align ``[source, target_1, ...]`` for ``mode`` and place reweight/blend/override words on tokens."""
    if mode not in MODES:
        raise EditLabError(f"unknown edit mode {mode!r}; choose one of {MODES}")
    if len(prompts) < 2:
        raise EditLabError("prompt-to-prompt needs a source prompt and at least one target prompt")
    words = [split_words(p, tokenize, length) for p in prompts]
    n = len(prompts) - 1
    base = torch.zeros(n, length, length)
    keep = torch.ones(n, length)
    for t in range(n):
        src, tgt = words[0], words[t + 1]
        if mode == "replace":
            base[t] = replace_map(src, tgt, length)
        elif mode == "refine":
            mapper, alphas = refine_map(token_ids(src, bos, eos), token_ids(tgt, bos, eos), length)
            base[t] = refine_matrix(mapper, length)
            keep[t] = alphas
        else:
            if [w.tokens for w in src] != [w.tokens for w in tgt]:
                raise EditLabError(
                    f"reweight alone keeps the source prompt, but target {t + 1} differs ({prompts[t + 1]!r}); "
                    "use replace (word swap) or refine (added words) — reweight words apply on top of either"
                )
            base[t] = torch.eye(length)

    def fill_targets(table: torch.Tensor, word: str, value: float, what: str) -> None:
        """Write ``value`` at the word's token positions in every target row; the word must occur somewhere."""
        hits = 0
        for t in range(n):
            pos = find_words(words[t + 1], word)
            table[t, pos] = value
            hits += len(pos)
        if not hits:
            raise EditLabError(f"{what} {word!r} is not in the target prompt(s): {list(prompts[1:])}")

    weights = torch.ones(n, length)
    for word, factor in reweight:
        fill_targets(weights, word, factor, "reweight word")

    until = torch.full((n, length), float("nan"))
    for word, frac in replace_overrides:
        if not 0.0 <= frac <= 1.0:
            raise EditLabError(f"cross-replace override {word}:{frac} must be a fraction in [0, 1]")
        fill_targets(until, word, frac, "cross-replace override word")

    blend = torch.zeros(len(prompts), length)
    for word in blend_words:
        hits = 0
        for r, ws in enumerate(words):
            pos = find_words(ws, word)
            blend[r, pos] = 1.0
            hits += len(pos)
        if not hits:
            raise EditLabError(f"blend word {word!r} is in none of the prompts: {list(prompts)}")
    return EditSpec(list(prompts), words, mode, base, keep, weights, until, blend, length)


SUBJECT_WORD = "<subject>"  # the target-row word standing for a subject's vectors (display only)


def subject_edit_spec(
    source: str,
    subject_word: str,
    target_class: str,
    n_subject: int,
    tokenize: Tokenize,
    *,
    bos: int,
    eos: int,
    blend: bool = True,
    subject_weight: float = 1.0,
    length: int = MAX_TOKENS,
) -> EditSpec:
    """Refine spec for subject-driven editing (BLIP-Diffusion §7: DDIM inversion + refine + local blend).

    The target is the source with ``n_subject`` subject vectors inserted before the first occurrence of
    ``subject_word`` (which ``target_class``, if given, renames): for a source "a dog ..." the vectors sit at
    position 2, after BOS and "a", as in the reference. The vectors are a word ``SUBJECT_WORD`` of
    ``n_subject`` tokens with ids no tokenizer emits (negative), so refine's global alignment keeps every
    source token in place and marks the vectors (and a renamed class) as new: their attention is their own,
    everything else follows the source. ``blend``: local blend on the subject word in both rows and on the
    vectors; ``subject_weight``: reweight factor of the vectors' attention.
    """
    words = source.split()
    phrase = [normalise(p) for p in subject_word.split() if normalise(p)]
    if not phrase:
        raise EditLabError("the subject word is empty: name the word of the source prompt the subject "
                           "replaces, e.g. 'dog' in 'a photo of a dog on the grass'")
    keys = [normalise(w) for w in words]
    at = next((i for i in range(len(keys) - len(phrase) + 1) if keys[i:i + len(phrase)] == phrase), None)
    if at is None:
        raise EditLabError(f"the subject word {subject_word!r} is not in the source prompt {source!r}; the "
                           "source prompt describes the photo and must name the object to replace")
    renamed = words[at:at + len(phrase)]
    if target_class.strip():  # the new class word keeps the old one's trailing punctuation ("dog," -> "cat,")
        last = renamed[-1]
        renamed = target_class.split()
        renamed[-1] += last[len(last.rstrip(string.punctuation)):]
    target = " ".join([*words[:at], SUBJECT_WORD, *renamed, *words[at + len(phrase):]])
    placeholder = [-(i + 1) for i in range(n_subject)]

    def tokenize_with_subject(word: str) -> list[int]:
        return placeholder if word == SUBJECT_WORD else tokenize(word)

    used = sum(len(tokenize_with_subject(w)) for w in target.split())
    if used + 2 > length:  # checked here so the message can name the subject's share of the chunk
        raise EditLabError(
            f"the target row needs {used} tokens (the source prompt {source!r} plus the subject's {n_subject} "
            f"vectors) but one CLIP chunk holds {length - 2}: shorten the source prompt"
        )
    spec = build_edit_spec([" ".join(words), target], "refine", tokenize_with_subject, bos=bos, eos=eos,
                           blend_words=[subject_word, " ".join(renamed)] if blend else [], length=length)
    subject = next(w for w in spec.words[1] if w.text == SUBJECT_WORD).positions
    if blend:
        spec.blend[1, subject] = 1.0
    spec.weights[0, subject] = float(subject_weight)
    return spec


# -- schedule -------------------------------------------------------------------------------------

def step_index(sigma: float, sample_sigmas: Sequence[float]) -> int:
    """The sampler step ``k`` with ``sigma_k >= sigma > sigma_{k+1}`` (intermediate evaluations of
    multi-stage samplers belong to the step they are taken in)."""
    k = sum(1 for s in sample_sigmas[:-1] if s >= sigma * (1.0 - 1e-5)) - 1
    return max(0, min(k, max(len(sample_sigmas) - 2, 0)))


def cross_alpha(spec: EditSpec, default: float, step: int, steps: int) -> torch.Tensor:
    """alpha[t, j] = 1 while ``step < int(fraction_j * (steps + 1))`` (the reference's time-word alphas)."""
    frac = torch.where(torch.isnan(spec.replace_until), torch.full_like(spec.replace_until, default), spec.replace_until)
    end = torch.floor(frac * (steps + 1))
    return (step < end).float()


def self_replace_active(fraction: float, step: int, steps: int) -> bool:
    return step < int(steps * fraction)


def blend_active(start_blend: float, step: int, steps: int) -> bool:
    """The reference blends from the step after ``int(start_blend * steps)`` (its counter starts at 1)."""
    return step + 1 > int(start_blend * steps)


def cross_coefficients(spec: EditSpec, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``S [n, L, L]`` and ``T [n, L]`` with ``A_new = A_src S + A_tgt diag(T)`` (see the module doc)."""
    c = spec.keep * spec.weights * alpha
    s = spec.base * c[:, None, :]
    t = (1.0 - spec.keep) * spec.weights * alpha + (1.0 - alpha)
    return s, t


# -- edited attention -----------------------------------------------------------------------------

def chunk_layout(batch: int, cond_or_uncond: Sequence[int], rows: int) -> list[int]:
    """Source-row index of every conditional chunk; refuses a batch that is not ``rows`` per chunk."""
    chunks = max(len(cond_or_uncond), 1)
    if batch % chunks or batch // chunks != rows:
        raise EditLabError(
            f"the sampled batch has {batch // chunks} rows per conditioning but the edit has {rows} prompts "
            f"(source + {rows - 1} target(s)); sample a latent batch of {rows} that starts from one noise "
            "(EditLab P2P Latent Batch) with the CONDITIONING from Prompt Pair Encode"
        )
    return [j * rows for j, c in enumerate(cond_or_uncond) if c == 0]


def _fold(t: torch.Tensor, length: int) -> torch.Tensor:
    """Keys repeated to a common length (ComfyUI pads conds by repetition): the first copy."""
    return t[:, :length] if t.shape[1] != length else t


def edited_cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                           sources: Sequence[int], s: torch.Tensor, t: torch.Tensor,
                           attention: Attention, own: Optional[Sequence[bool]] = None,
                           from_source: Optional[Sequence[bool]] = None) -> torch.Tensor:
    """Cross-attention of the whole batch with every target row ``A_src S + A_tgt diag(T)`` (rows after
    each source index in ``sources``). ``s``/``t`` as :func:`cross_coefficients`, on q's device;
    ``own[i]`` / ``from_source[i]``: whether target i's T / S is non-zero (computed here if not given;
    the controller passes host-side flags so the step loop does not wait on the device)."""
    n, length = t.shape
    if own is None:
        own = (t.abs().amax(dim=1) > 0).tolist()
    if from_source is None:
        from_source = (s.abs().flatten(1).amax(dim=1) > 0).tolist()
    keys = k.shape[1]
    if keys % length:
        raise EditLabError(f"the conditioning has {keys} tokens per row; prompt-to-prompt needs {length} (one CLIP chunk)")
    reps = keys // length
    b, _, hd = v.shape
    d = hd // heads
    # Host-side bookkeeping only (no device reads): which target rows swap to the source's queries and
    # keys (T = 0), which keep their own attention (T != 0) and which of those add a source term.
    pairs = [(src, src + 1 + j, j) for src in sources for j in range(n)]
    swap = [(src, row, j) for src, row, j in pairs if not own[j]]
    keep = [(src, row, j) for src, row, j in pairs if own[j]]
    both = [(src, row, j) for src, row, j in keep if from_source[j]]
    dev = q.device

    def index(rows: list[int]) -> torch.Tensor:
        return torch.tensor(rows, device=dev, dtype=torch.long)

    def source_values(sel) -> torch.Tensor:
        """``S_j V_tgt`` for the selected targets, indexed by source token (tiled to the key length)."""
        vt = _fold(v.index_select(0, index([row for _, row, _ in sel])), length).reshape(len(sel), length, heads, d)
        sj = s.index_select(0, index([j for _, _, j in sel]))
        return torch.einsum("nst,nthd->nshd", sj, vt).reshape(len(sel), length, hd).repeat(1, reps, 1)

    q2, k2, v2 = q, k, v.clone()
    if swap:  # A_new = A_src S: these rows attend with their source's queries and keys
        gather = list(range(b))
        for src, row, _ in swap:
            gather[row] = src
        g = index(gather)
        q2, k2 = q.index_select(0, g), k.index_select(0, g)
        v2[index([row for _, row, _ in swap])] = source_values(swap)
    if keep:  # A_tgt diag(T): scale the values of the target's own attention
        rows = index([row for _, row, _ in keep])
        tk = t.index_select(0, index([j for _, _, j in keep])).repeat(1, reps)
        v2[rows] = v.index_select(0, rows) * tk[:, :, None]
    out = attention(q2, k2, v2, heads)
    if both:  # + A_src S for targets that also keep their own attention (refine's new tokens)
        srcs = index([src for src, _, _ in both])
        rows = index([row for _, row, _ in both])
        out[rows] = out[rows] + attention(q.index_select(0, srcs), k.index_select(0, srcs), source_values(both), heads)
    return out


def replaced_self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, sources: Sequence[int],
                            rows: int, attention: Attention) -> torch.Tensor:
    """Self-attention with every target row's map replaced by its source's: ``attn(q_src, k_src, v_tgt)``."""
    q2, k2 = q.clone(), k.clone()
    for s in sources:
        q2[s + 1:s + rows] = q[s:s + 1]
        k2[s + 1:s + rows] = k[s:s + 1]
    return attention(q2, k2, v, heads)


# -- local blend ----------------------------------------------------------------------------------

def blend_mask(maps: torch.Tensor, grid: tuple[int, int], blend: torch.Tensor, size: tuple[int, int],
               threshold: float) -> torch.Tensor:
    """Local-blend masks ``[rows, 1, H, W]`` (1 = edit) from summed cross-attention maps ``[rows, P, L]``.

    The blend words' maps (summed over their tokens), max-pooled 3x3, upsampled (nearest) to the latent,
    normalised by their maximum and thresholded; every target's mask is united with the source's.
    """
    rows = maps.shape[0]
    m = (maps * blend.to(maps)[:, None, :]).sum(-1).reshape(rows, 1, *grid)
    m = F.max_pool2d(m, 3, stride=1, padding=1)
    m = F.interpolate(m, size=size)
    m = m / m.amax(dim=(2, 3), keepdim=True).clamp_min(torch.finfo(m.dtype).tiny)
    mask = m > threshold
    return (mask[:1] | mask).float()


def blended_denoised(x: torch.Tensor, denoised: torch.Tensor, mask: torch.Tensor, ratio: float) -> torch.Tensor:
    """Target rows' denoised prediction such that an Euler/DDIM step lands on the blended latent.

    The reference blends after each step: ``x_tgt <- x_src + mask (x_tgt - x_src)``. An Euler step is
    ``x_next = r x + (1 - r) D`` with ``r = sigma_next / sigma``; with ``B(z) = z_src + mask (z - z_src)``,
    returning ``D' = B(D) + r / (1 - r) (B(x) - x)`` gives ``x_next = B(r x + (1 - r) D)`` exactly. At
    the last step (``r = 0``) this is ``B(D)`` for any sampler.
    """
    out = denoised.clone()
    m = mask.to(denoised)
    d_src, x_src = denoised[:1], x[:1]
    out[1:] = d_src + m[1:] * (denoised[1:] - d_src)
    if 0.0 < ratio < 1.0 - 1e-6:
        bx = x_src + m[1:] * (x[1:] - x_src)
        out[1:] = out[1:] + ratio / (1.0 - ratio) * (bx - x[1:])
    return out


# -- the controller -------------------------------------------------------------------------------

@dataclass
class ControlSettings:
    cross_replace: float = 0.8
    self_replace: float = 0.4
    self_max_tokens: int = 16 * 16
    map_size: int = 16
    blend_threshold: float = 0.3
    start_blend: float = 0.2


@dataclass(frozen=True)
class Step:
    """Where a forward pass is in its sampling run: step ``index`` of ``steps`` (from its own schedule)."""

    index: int
    steps: int


def step_of(sigma: float, sample_sigmas: Sequence[float]) -> Step:
    """The :class:`Step` of an evaluation at ``sigma`` on the schedule ``sample_sigmas`` (steps + 1 values)."""
    if len(sample_sigmas) < 2:
        raise EditLabError(f"prompt-to-prompt needs a schedule of at least one step, got sigmas {list(sample_sigmas)}")
    return Step(step_index(sigma, sample_sigmas), len(sample_sigmas) - 1)


@dataclass
class P2PRun:
    """The state of one sampling run: the attention maps it accumulates and its local-blend mask.

    Made by :meth:`P2PController.new_run` when a run starts and handed to every attention call of that run
    (the host carries it in the run's own options), so two runs of one controlled model never share it.
    """

    grid: tuple[int, int]
    maps: Optional[torch.Tensor] = None
    map_calls: int = 0
    mask: Optional[torch.Tensor] = None

    @property
    def map_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    def add_maps(self, p: torch.Tensor) -> None:
        self.maps = p if self.maps is None else self.maps + p
        self.map_calls += 1


@dataclass(frozen=True)
class MapsRecord:
    """What a finished run leaves for the Attention Maps viewer: maps averaged over calls ``[rows, P, L]``."""

    maps: torch.Tensor
    grid: tuple[int, int]
    mask: Optional[torch.Tensor]


def latent_fingerprint(samples: torch.Tensor) -> str:
    """Identity of a sampled latent by its exact values (shape, dtype, bytes): how a later node that is
    given the LATENT finds the run that produced it."""
    t = samples.detach().to("cpu").contiguous()
    digest = hashlib.sha256(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"").hexdigest()
    return f"{tuple(t.shape)}:{t.dtype}:{digest}"


class P2PController:
    """Prompt-to-prompt attention control for one edit spec; the host calls :meth:`new_run` when a sampling
    run starts, :meth:`cross` / :meth:`self_attention` in every attention layer (with the :class:`Step` read
    from that forward's own schedule and the run), :meth:`blend` on the denoised prediction and
    :meth:`finish` with the run's output.

    ``levels``: downsample factors of the model's cross-attention layers (to pick the map resolution
    nearest ``settings.map_size``). Copies made by ``copy.deepcopy`` (ComfyUI's ``model.clone()``) are this
    same object; it holds no run state, only the records of finished runs keyed by their output latent.
    """

    RECORDS = 16  # finished runs remembered for the viewer (a few samplers, re-queues)

    def __init__(self, spec: EditSpec, settings: ControlSettings, levels: Sequence[int]):
        self.spec = spec
        self.settings = settings
        self.levels = sorted(set(int(f) for f in levels)) or [1]
        self._records: OrderedDict[str, MapsRecord] = OrderedDict()
        self._coeff_memo: tuple = (None, None)

    def __deepcopy__(self, memo):
        return self

    # -- runs -------------------------------------------------------------------------------------
    def map_level(self, latent_size: tuple[int, int]) -> tuple[int, int]:
        """Grid of the attention layers whose side is nearest ``map_size`` (log scale; ties: larger)."""
        h, w = latent_size
        best = None
        for f in self.levels:
            gh, gw = -(-h // f), -(-w // f)
            side = math.sqrt(gh * gw)
            key = (abs(math.log(side / self.settings.map_size)), -side)
            if best is None or key < best[0]:
                best = (key, (gh, gw))
        return best[1]

    def new_run(self, batch: int, latent_size: tuple[int, int]) -> P2PRun:
        """The state of a sampling run of ``batch`` rows on a ``latent_size`` latent (checked against the edit)."""
        if batch != self.spec.rows:
            raise EditLabError(
                f"the latent batch is {batch} but the edit has {self.spec.rows} prompts (source + "
                f"{self.spec.targets} target(s)); feed the sampler a batch of {self.spec.rows} rows from one "
                "noise (EditLab P2P Latent Batch) and the CONDITIONING of Prompt Pair Encode"
            )
        return P2PRun(grid=self.map_level(tuple(latent_size)))

    def finish(self, run: P2PRun, samples: torch.Tensor) -> Optional[MapsRecord]:
        """Record the run's maps under its output latent (``samples``: what the sampler returns)."""
        if run.maps is None:
            return None
        record = MapsRecord((run.maps / max(run.map_calls, 1)).cpu(), run.grid,
                            None if run.mask is None else run.mask.cpu())
        key = latent_fingerprint(samples)
        self._records.pop(key, None)
        self._records[key] = record
        while len(self._records) > self.RECORDS:
            self._records.popitem(last=False)
        return record

    def maps_for(self, samples: torch.Tensor) -> Optional[MapsRecord]:
        """The record of the run whose output is exactly ``samples``, if this controller made it."""
        return self._records.get(latent_fingerprint(samples))

    def _coefficients(self, step: Step, device, dtype):
        """(active, S, T, host flags) of a step; a one-entry memo (the ~30 layers of a forward share it)."""
        key = (step, device, dtype)
        if self._coeff_memo[0] == key:
            return self._coeff_memo[1]
        alpha = cross_alpha(self.spec, self.settings.cross_replace, step.index, step.steps)
        s, t = cross_coefficients(self.spec, alpha)
        active = bool((alpha > 0).any())
        flags = ((t.abs().amax(dim=1) > 0).tolist(), (s.abs().flatten(1).amax(dim=1) > 0).tolist())
        c = (active, s.to(device, dtype), t.to(device, dtype), flags)
        self._coeff_memo = (key, c)
        return c

    # -- attention ----------------------------------------------------------------------------------
    def cross(self, q, k, v, heads: int, cond_or_uncond: Sequence[int], step: Step, attention: Attention,
              run: Optional[P2PRun] = None) -> torch.Tensor:
        sources = chunk_layout(q.shape[0], cond_or_uncond, self.spec.rows)
        if run is not None and sources and q.shape[1] == run.map_tokens:
            self._store_maps(run, q, k, heads, sources[0])
        active, s, t, (own, from_source) = self._coefficients(step, q.device, v.dtype)
        if not active or not sources:
            return attention(q, k, v, heads)
        return edited_cross_attention(q, k, v, heads, sources, s, t, attention, own, from_source)

    def self_attention(self, q, k, v, heads: int, cond_or_uncond: Sequence[int], step: Step,
                       attention: Attention) -> torch.Tensor:
        sources = chunk_layout(q.shape[0], cond_or_uncond, self.spec.rows)
        if (not sources or q.shape[1] > self.settings.self_max_tokens
                or not self_replace_active(self.settings.self_replace, step.index, step.steps)):
            return attention(q, k, v, heads)
        return replaced_self_attention(q, k, v, heads, sources, self.spec.rows, attention)

    def _store_maps(self, run: P2PRun, q, k, heads: int, source: int) -> None:
        """Head-averaged maps of the conditional rows (unedited, as the reference stores them)."""
        rows = slice(source, source + self.spec.rows)
        run.add_maps(attention_probs(q[rows], _fold(k[rows], self.spec.length), heads).mean(1))

    # -- local blend ----------------------------------------------------------------------------------
    def blend(self, run: P2PRun, x: torch.Tensor, denoised: torch.Tensor, sigma: float,
              sample_sigmas: Sequence[float]) -> torch.Tensor:
        """The denoised prediction with the targets blended (see :func:`blended_denoised`)."""
        step = step_of(sigma, sample_sigmas)
        if (not self.spec.has_blend or run.maps is None
                or not blend_active(self.settings.start_blend, step.index, step.steps)):
            return denoised
        mask = blend_mask(run.maps, run.grid, self.spec.blend.to(run.maps.device), tuple(x.shape[-2:]),
                          self.settings.blend_threshold)
        run.mask = mask
        sig, k = sample_sigmas, step.index
        ratio = 0.0
        if abs(sig[k] - sigma) <= 1e-5 * max(sigma, 1e-8):  # an evaluation at the step's start sigma
            ratio = sig[k + 1] / sig[k] if sig[k] > 0 else 0.0
        return blended_denoised(x, denoised, mask.to(x.device), ratio)
