"""Dual classifier-free guidance: InstructPix2Pix (Brooks et al., CVPR 2023) and any two-condition pair.

Three predictions per step, from three condition levels:

* ``neither``   - no condition at all            (IP2P: no image, empty/negative text)   e(∅, ∅)
* ``base_only`` - the base condition only        (IP2P: image + empty/negative text)     e(c_I, ∅)
* ``both``      - base and extra condition       (IP2P: image + instruction)             e(c_I, c_T)

combined as (docs/methods.md §6, Brooks et al. eq. 3)::

    e = e(∅, ∅) + s_I (e(c_I, ∅) - e(∅, ∅)) + s_T (e(c_I, c_T) - e(c_I, ∅))

``base_scale`` is s_I (raise it to keep more of the input image), ``extra_scale`` is s_T (raise it to
follow the instruction harder). The weights sum to one, so the combination is the same whether it is
taken on noise (eps), denoised (x0) or v predictions; ComfyUI's guiders work on denoised predictions.

Added over ComfyUI's ``DualCFGGuider``: per-step schedules for both scales (start -> end over the
sampling run) and guidance rescale (Lin et al., *Common Diffusion Noise Schedules and Sample Steps are
Flawed*, WACV 2024, eq. 15-16) against over-saturation at high scales.

Pure torch: nothing here imports ComfyUI.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional, Sequence, Union

import torch

from ..errors import EditLabError

Shape = Literal["constant", "linear", "cosine"]
SHAPES: tuple[str, ...] = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class ScaleSchedule:
    """A guidance scale over the sampling run: ``start`` at the first step, ``end`` at the last.

    ``fraction`` is the position in the run, 0 at the first step and 1 at the last (see
    :func:`step_fraction`). Shapes:

    * ``constant``: ``start`` throughout (``end`` is ignored);
    * ``linear``:   ``start + (end - start) * f``;
    * ``cosine``:   ``start + (end - start) * (1 - cos(pi f)) / 2`` (flat near both ends).
    """

    start: float
    end: float
    shape: Shape = "constant"

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise EditLabError(f"unknown schedule shape {self.shape!r}; choose one of {SHAPES}")
        for name in ("start", "end"):
            value = getattr(self, name)
            if not math.isfinite(float(value)):
                raise EditLabError(f"schedule {name} must be a finite number, got {value!r}")

    def at(self, fraction: float) -> float:
        f = min(max(float(fraction), 0.0), 1.0)
        if self.shape == "constant":
            return float(self.start)
        if self.shape == "linear":
            w = f
        elif self.shape == "cosine":
            w = 0.5 * (1.0 - math.cos(math.pi * f))
        else:  # unreachable after __post_init__; never read an unknown shape as one of the others
            raise EditLabError(f"unknown schedule shape {self.shape!r}; choose one of {SHAPES}")
        return float(self.start) + (float(self.end) - float(self.start)) * w


def step_fraction(sigma: float, sample_sigmas: Optional[Union[Sequence[float], torch.Tensor]]) -> float:
    """Where ``sigma`` lies in the run ``sample_sigmas``: 0 at the first step, 1 at the last step.

    Step ``i`` of an ``n``-step run is evaluated at ``sample_sigmas[i]`` (``i = 0 .. n-1``; the last entry
    is where the run ends, usually 0) and gets fraction ``i / (n - 1)``. Samplers that also evaluate
    between schedule points (Heun, DPM-2) get the fraction interpolated linearly between the neighbouring
    steps. Without a schedule (or with a one-step run) the fraction is 0: the start values are used.
    """
    if sample_sigmas is None:
        return 0.0
    s = [float(v) for v in (sample_sigmas.flatten().tolist() if isinstance(sample_sigmas, torch.Tensor) else sample_sigmas)]
    n = len(s) - 1
    if n <= 1:
        return 0.0
    sigma = float(sigma)
    if sigma >= s[0]:
        return 0.0
    for k in range(n):
        hi, lo = s[k], s[k + 1]
        if hi >= sigma >= lo:
            pos = k + ((hi - sigma) / (hi - lo) if hi > lo else 0.0)
            return min(pos / (n - 1), 1.0)
    return 1.0


def dual_cfg(both: torch.Tensor, base_only: torch.Tensor, neither: torch.Tensor,
             extra_scale: float, base_scale: float) -> torch.Tensor:
    """``neither + base_scale (base_only - neither) + extra_scale (both - base_only)`` (Brooks et al. eq. 3)."""
    return neither + base_scale * (base_only - neither) + extra_scale * (both - base_only)


def _std(t: torch.Tensor) -> torch.Tensor:
    return t.std(dim=tuple(range(1, t.ndim)), keepdim=True)


def rescale_guidance(guided: torch.Tensor, conditional: torch.Tensor, phi: float) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2024, eq. 15-16), per sample over all non-batch dimensions.

    ``rescaled = guided * std(conditional) / std(guided)``, then ``phi * rescaled + (1 - phi) * guided``.
    Meant for v-predictions (the paper's space); see :func:`to_v`.
    """
    if phi == 0.0:
        return guided
    rescaled = guided * (_std(conditional) / _std(guided).clamp_min(1e-12))
    return phi * rescaled + (1.0 - phi) * guided


def _sigma_like(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return sigma.reshape(sigma.shape[:1] + (1,) * (x.ndim - 1)) if sigma.ndim else sigma


def to_v(x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The v-prediction equivalent to ``denoised`` at ``x = x0 + sigma * eps`` (k-space).

    With ``alpha = 1 / sqrt(1 + sigma^2)``: ``v = alpha eps - sigma alpha x0 = (x - (1 + sigma^2) D) / (sigma sqrt(1 + sigma^2))``
    (the same conversion ComfyUI's RescaleCFG uses).
    """
    s = _sigma_like(sigma, x)
    return (x - (1.0 + s * s) * denoised) / (s * torch.sqrt(1.0 + s * s))


def from_v(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_v`: the denoised prediction for a v-prediction."""
    s = _sigma_like(sigma, x)
    return (x - v * s * torch.sqrt(1.0 + s * s)) / (1.0 + s * s)


@dataclass(frozen=True)
class DualCFG:
    """The combiner's settings: two scheduled scales and the guidance-rescale factor."""

    extra: ScaleSchedule
    base: ScaleSchedule
    rescale: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.rescale) <= 1.0:
            raise EditLabError(
                f"guidance rescale must be in [0, 1], got {self.rescale}; 0 = off, 0.7 is the paper's value")

    def scales_at(self, fraction: float) -> tuple[float, float]:
        """(extra_scale, base_scale) at this point of the run."""
        return self.extra.at(fraction), self.base.at(fraction)

    def combine(self, x: torch.Tensor, sigma: torch.Tensor, both: torch.Tensor, base_only: torch.Tensor,
                neither: torch.Tensor, fraction: float) -> torch.Tensor:
        """The guided denoised prediction from the three denoised predictions at ``(x, sigma)``.

        1. scales at this step; 2. dual CFG (affine in the predictions, so taken on denoised directly);
        3. optional rescale in v space against the fully conditioned prediction ``both``.
        """
        extra_scale, base_scale = self.scales_at(fraction)
        guided = dual_cfg(both, base_only, neither, extra_scale, base_scale)
        if self.rescale == 0.0:
            return guided
        v_guided = to_v(x, guided, sigma)
        v_both = to_v(x, both, sigma)
        return from_v(x, rescale_guidance(v_guided, v_both, float(self.rescale)), sigma)

    def needs(self, fraction: float) -> tuple[bool, bool]:
        """Which of (base_only, neither) this step needs; ``both`` is always needed.

        ``base_scale == 1`` cancels ``neither``; with ``extra_scale == 1`` as well, ``base_only`` cancels too
        (the result is the plain ``both`` prediction), so those forward passes can be skipped.
        """
        extra_scale, base_scale = self.scales_at(fraction)
        need_neither = not math.isclose(base_scale, 1.0)
        need_base = need_neither or not math.isclose(extra_scale, 1.0)
        return need_base, need_neither
