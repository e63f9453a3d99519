"""DDIM inversion, null-text inversion and the INVERSION record (docs/methods.md §3-4), in k-space.

Notation: ``x = x0 + sigma * eps`` (ComfyUI / k-diffusion); the DDPM latent is
``x_t = x / sqrt(1 + sigma^2)``. A sampling schedule ``sigmas`` is descending and ends at 0; the
trajectory is stored in the same order: ``trajectory[i]`` is the latent at ``sigmas[i]``, so
``trajectory[0]`` is x_T and ``trajectory[-1]`` is the clean latent. On a flow-matching model
(``family=FLOW``, docs/methods.md §11) the same first-order step inverts the flow ODE,
``x' = x + (sigma' - sigma) v`` with ``v = (x - D) / sigma``. No ComfyUI imports.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from typing import Callable, Literal, Optional

import torch

from ..errors import EditLabError
from . import family as fam
from .family import K_SPACE, ModelFamily

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
InputScaling = Literal["reference", "k-space"]
INPUT_SCALINGS = ("reference", "k-space")
FORMAT = "editlab.inversion/1"


def ddpm(x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """k-space latent -> DDPM latent ``x / sqrt(1 + sigma^2)`` (where the papers measure losses)."""
    return x / math.sqrt(1.0 + float(sigma) ** 2)


def check_schedule(sigmas: torch.Tensor, where: str = "") -> torch.Tensor:
    """A schedule DDIM inversion can walk: strictly decreasing, finite, ending at 0. ``where`` prefixes
    the message (e.g. the file the schedule was read from)."""
    at = f"{where}: " if where else ""
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise EditLabError(f"{at}the schedule needs at least one step (got {sigmas.numel()} sigma values); raise steps")
    if not torch.isfinite(sigmas).all():
        raise EditLabError(f"{at}the schedule contains NaN or inf")
    if (sigmas[1:] >= sigmas[:-1]).any():
        raise EditLabError(f"{at}the schedule must be strictly decreasing (noisiest first)")
    if float(sigmas[-1]) != 0.0:
        raise EditLabError(f"{at}the schedule must end at sigma 0 to invert a clean image (ends at {float(sigmas[-1]):.4g})")
    return sigmas


def invert_step(denoise: Denoiser, x: torch.Tensor, sigma_lo: float, sigma_hi: float,
                scaling: InputScaling = "reference", family: ModelFamily = K_SPACE) -> torch.Tensor:
    """One DDIM inversion step from level ``sigma_lo`` up to ``sigma_hi``.

    1. evaluate eps on the *current* latent at the *next* level (Mokady et al. / PnP-Inversion
       ``next_step``). With ``scaling="reference"`` the network sees the current latent in its own
       DDPM scaling, ``x_lo / sqrt(1 + sigma_lo^2)``, at the timestep of ``sigma_hi`` — exactly what the
       reference feeds the UNet; ``"k-space"`` passes ``x_lo`` as a k-space latent at ``sigma_hi``.
    2. x_hi = x_lo + (sigma_hi - sigma_lo) * eps  (DDIM eta = 0 run backwards).
    On flow, eps is the velocity ``v(x_lo, sigma_hi)`` and the latent is fed unscaled
    (:func:`family.inversion_input_scale`): the first-order flow inversion of docs/methods.md §11.
    """
    scale = fam.inversion_input_scale(family, scaling, sigma_lo, sigma_hi)
    x_in = x * scale
    s = x.new_full((x.shape[0],), sigma_hi)
    d = fam.derivative(x_in, denoise(x_in, s), sigma_hi)
    return fam.ode_step(x, d, sigma_lo, sigma_hi)


@torch.no_grad()
def ddim_invert(denoise: Denoiser, x0: torch.Tensor, sigmas: torch.Tensor, *,
                scaling: InputScaling = "reference",
                on_step: Optional[Callable[[int, int], None]] = None,
                family: ModelFamily = K_SPACE) -> torch.Tensor:
    """Invert a clean latent along a sampling schedule; returns the trajectory ``[N+1, *x0.shape]``
    in sampling order (``[0]`` = x_T at ``sigmas[0]``, ``[-1]`` = ``x0``), stored on the CPU."""
    check_schedule(sigmas)
    if scaling not in INPUT_SCALINGS:
        raise EditLabError(f"input_scaling: {scaling!r} is not one of {list(INPUT_SCALINGS)}")
    levels = [float(s) for s in sigmas.flip(0)]
    traj = [x0.detach().float().cpu()]
    x = x0
    n = len(levels) - 1
    for k in range(n):
        x = invert_step(denoise, x, levels[k], levels[k + 1], scaling, family)
        traj.append(x.detach().float().cpu())
        if on_step is not None:
            on_step(k + 1, n)
    return torch.stack(traj[::-1])


def euler_step(x: torch.Tensor, denoised: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """Deterministic DDIM (= Euler on eps-models) step: x' = x + (sigma' - sigma) * (x - D) / sigma."""
    return x + (sigma_next - sigma) * (x - denoised) / sigma


def landing_denoised(x: torch.Tensor, target: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """The x0 prediction that makes an Euler/DDIM step from ``x`` land exactly on ``target``.

    Direct inversion (Ju et al. 2024) snaps the source row onto the pivot trajectory after every step;
    a GUIDER cannot move x, so it returns this prediction instead: D = x - sigma (target - x) / (sigma' - sigma).
    """
    return x - sigma * (target - x) / (sigma_next - sigma)


@dataclass
class Inversion:
    """What DDIM inversion (and null-text optimisation) produce, and what editing consumes.

    ``trajectory[i]`` is the pivot latent at ``sigmas[i]`` (model space, on the CPU);
    ``null_embeddings[i]`` (optional) is the unconditional embedding for step i;
    ``source_embedding`` / ``source_pooled`` are the source prompt's conditioning tensors.
    """

    sigmas: torch.Tensor
    trajectory: torch.Tensor
    source_embedding: torch.Tensor
    model_id: str
    guidance: float = 1.0
    scaling: str = "reference"
    source_pooled: Optional[torch.Tensor] = None
    null_embeddings: Optional[torch.Tensor] = None
    meta: dict = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    @property
    def batch(self) -> int:
        return int(self.trajectory.shape[1])

    @property
    def noise(self) -> torch.Tensor:
        return self.trajectory[0]

    def with_nulls(self, nulls: torch.Tensor, **meta) -> "Inversion":
        return replace(self, null_embeddings=nulls, meta={**self.meta, **meta})

    def validate(self, where: str = "") -> "Inversion":
        """Check the record's shapes and values; ``where`` (e.g. the file name) prefixes every message."""
        at = f"{where}: " if where else ""
        check_schedule(self.sigmas, where)
        if self.trajectory.ndim < 3 or self.trajectory.shape[0] != len(self.sigmas):
            raise EditLabError(
                f"{at}trajectory shape {tuple(self.trajectory.shape)} does not match {len(self.sigmas)} sigma levels")
        for name in ("trajectory", "source_embedding", "null_embeddings", "source_pooled"):
            t = getattr(self, name)
            if t is not None and not torch.isfinite(t).all():
                raise EditLabError(f"{at}the inversion's {name} contains NaN or inf")
        if self.null_embeddings is not None and self.null_embeddings.shape[0] != self.steps:
            raise EditLabError(f"{at}{self.null_embeddings.shape[0]} null embeddings for {self.steps} steps")
        return self

    def step_index(self, sigma: float, rel_tol: float = 1e-4) -> int:
        """Index i with sigmas[i] == sigma (a sampler evaluating at a level the inversion never saw is refused)."""
        diffs = (self.sigmas[:-1] - sigma).abs()
        i = int(diffs.argmin())
        if diffs[i] > rel_tol * max(1.0, abs(sigma)):
            raise EditLabError(
                f"the sampler evaluated the model at sigma {sigma:.5g}, which is not a level of the inversion's "
                f"schedule ({self.steps} steps, {float(self.sigmas[0]):.4g} -> 0). Use the SIGMAS output of "
                "DDIM Invert and a single-evaluation sampler (euler / ddim)"
            )
        return i

    def check_schedule_matches(self, sigmas: torch.Tensor) -> int:
        """The sampling schedule must be the inversion's or a tail of it (a suffix ending at 0, e.g. the
        low half of SplitSigmas); returns the index of its first level in the inversion's schedule."""
        s = sigmas.detach().float().cpu()
        n = len(s)
        ours = f"{self.steps} steps, {float(self.sigmas[0]):.4g} -> 0"
        if n < 2 or n > len(self.sigmas):
            raise EditLabError(
                f"the sampling schedule has {n - 1} steps but the inversion has {self.steps}; connect DDIM Invert's "
                "SIGMAS output to the sampler (or a tail of it, e.g. SplitSigmas' low sigmas)")
        start = len(self.sigmas) - n
        if not torch.allclose(s, self.sigmas[start:].float(), rtol=1e-4, atol=1e-6):
            raise EditLabError(
                f"the sampling schedule does not match the inversion's ({ours}; got {n - 1} steps, "
                f"{float(s[0]):.4g} -> {float(s[-1]):.4g}) and is not a tail of it ending at 0 (a different scheduler, steps or model "
                "sampling, or the high half of SplitSigmas); connect DDIM Invert's SIGMAS output, or its low "
                "SplitSigmas half, to the sampler")
        return start

    # -- (de)serialisation: plain tensors + string metadata, for safetensors -------------------------
    def to_state(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        tensors = {"sigmas": self.sigmas.float().contiguous(), "trajectory": self.trajectory.float().contiguous(),
                   "source_embedding": self.source_embedding.float().contiguous()}
        if self.source_pooled is not None:
            tensors["source_pooled"] = self.source_pooled.float().contiguous()
        if self.null_embeddings is not None:
            tensors["null_embeddings"] = self.null_embeddings.float().contiguous()
        meta = {"format": FORMAT, "model_id": self.model_id, "guidance": repr(float(self.guidance)),
                "scaling": self.scaling, "meta": json.dumps(self.meta, sort_keys=True)}
        return tensors, meta

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, str], where: str = "") -> "Inversion":
        """The record back from ``to_state``; ``where`` (the file it was read from) prefixes every message."""
        at = f"{where}: " if where else ""
        if (meta or {}).get("format") != FORMAT:
            raise EditLabError(f"{at}not an EditLab inversion file (no 'editlab.inversion/1' format tag)")
        missing = [k for k in ("sigmas", "trajectory", "source_embedding") if k not in tensors]
        if missing:
            raise EditLabError(f"{at}the inversion file is incomplete: missing {', '.join(missing)}")
        try:
            extra = json.loads(meta.get("meta", "{}"))
            guidance = float(meta.get("guidance", "1.0"))
        except ValueError as exc:
            raise EditLabError(f"{at}the inversion file's metadata is corrupt ({exc})") from exc
        return cls(sigmas=tensors["sigmas"], trajectory=tensors["trajectory"],
                   source_embedding=tensors["source_embedding"], model_id=meta.get("model_id", ""),
                   guidance=guidance, scaling=meta.get("scaling", "reference"),
                   source_pooled=tensors.get("source_pooled"), null_embeddings=tensors.get("null_embeddings"),
                   meta=extra).validate(where)


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: Optional[float] = None) -> float:
    """Peak signal-to-noise ratio in dB; ``data_range`` defaults to the reference's (b's) value range."""
    a, b = a.float(), b.float()
    if a.shape != b.shape:
        raise EditLabError(f"cannot compare shapes {tuple(a.shape)} and {tuple(b.shape)}")
    rng = float(b.max() - b.min()) if data_range is None else float(data_range)
    mse = float(((a - b) ** 2).mean())
    if mse == 0.0:
        return float("inf")
    return 10.0 * math.log10(rng**2 / mse)
