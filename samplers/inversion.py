"""DDIM inversion, null-text inversion and the INVERSION record (METHODS.md §3-4), in k-space.

Notation: ``x = x0 + sigma * eps`` (ComfyUI / k-diffusion); the DDPM latent is
``x_t = x / sqrt(1 + sigma^2)``. A sampling schedule ``sigmas`` is descending and ends at 0; the
trajectory is stored in the same order: ``trajectory[i]`` is the latent at ``sigmas[i]``, so
``trajectory[0]`` is x_T and ``trajectory[-1]`` is the clean latent. No ComfyUI imports.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from typing import Callable, Literal, Optional

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
InputScaling = Literal["reference", "k-space"]
FORMAT = "editlab.inversion/1"


class InversionError(ValueError):
    """A user-facing problem with an inversion or its inputs (the message says what to do)."""


def ddpm(x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """k-space latent -> DDPM latent ``x / sqrt(1 + sigma^2)`` (where the papers measure losses)."""
    return x / math.sqrt(1.0 + float(sigma) ** 2)


def check_schedule(sigmas: torch.Tensor) -> torch.Tensor:
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise InversionError(f"the schedule needs at least one step (got {sigmas.numel()} sigma values); raise steps")
    if not torch.isfinite(sigmas).all():
        raise InversionError("the schedule contains NaN or inf")
    if (sigmas[1:] >= sigmas[:-1]).any():
        raise InversionError("the schedule must be strictly decreasing (noisiest first)")
    if float(sigmas[-1]) != 0.0:
        raise InversionError(f"the schedule must end at sigma 0 to invert a clean image (ends at {float(sigmas[-1]):.4g})")
    return sigmas


def invert_step(denoise: Denoiser, x: torch.Tensor, sigma_lo: float, sigma_hi: float,
                scaling: InputScaling = "reference") -> torch.Tensor:
    """One DDIM inversion step from level ``sigma_lo`` up to ``sigma_hi``.

    1. evaluate eps on the *current* latent at the *next* level (Mokady et al. / PnP-Inversion
       ``next_step``). With ``scaling="reference"`` the network sees the current latent in its own
       DDPM scaling, ``x_lo / sqrt(1 + sigma_lo^2)``, at the timestep of ``sigma_hi`` — exactly what the
       reference feeds the UNet; ``"k-space"`` passes ``x_lo`` as a k-space latent at ``sigma_hi``.
    2. x_hi = x_lo + (sigma_hi - sigma_lo) * eps  (DDIM eta = 0 run backwards).
    """
    scale = math.sqrt(1.0 + sigma_hi**2) / math.sqrt(1.0 + sigma_lo**2) if scaling == "reference" else 1.0
    x_in = x * scale
    s = x.new_full((x.shape[0],), sigma_hi)
    eps = (x_in - denoise(x_in, s)) / sigma_hi
    return x + (sigma_hi - sigma_lo) * eps


@torch.no_grad()
def ddim_invert(denoise: Denoiser, x0: torch.Tensor, sigmas: torch.Tensor, *,
                scaling: InputScaling = "reference",
                on_step: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
    """Invert a clean latent along a sampling schedule; returns the trajectory ``[N+1, *x0.shape]``
    in sampling order (``[0]`` = x_T at ``sigmas[0]``, ``[-1]`` = ``x0``), stored on the CPU."""
    check_schedule(sigmas)
    levels = [float(s) for s in sigmas.flip(0)]
    traj = [x0.detach().float().cpu()]
    x = x0
    n = len(levels) - 1
    for k in range(n):
        x = invert_step(denoise, x, levels[k], levels[k + 1], scaling)
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
class NullTextConfig:
    """Mokady et al. 2023 hyper-parameters (METHODS.md §4)."""

    guidance: float = 7.5
    inner_steps: int = 10
    epsilon: float = 1e-5          # early stop when loss < epsilon + i * epsilon_slope
    epsilon_slope: float = 2e-5
    lr: float = 1e-2               # Adam lr at step i: lr * (1 - i / lr_decay_steps)
    lr_decay_steps: float = 100.0
    secant: bool = False           # EditLab's secant correction of each Adam update (see optimize_null_text)

    def validate(self) -> None:
        if self.inner_steps < 0:
            raise InversionError(f"inner steps must be >= 0, got {self.inner_steps}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise InversionError(f"learning rate must be a positive number, got {self.lr}")
        if not math.isfinite(self.guidance):
            raise InversionError(f"guidance must be finite, got {self.guidance}")


@dataclass
class NullTextStats:
    forwards: int = 0
    backwards: int = 0
    losses: list[float] = field(default_factory=list)
    iterations: list[int] = field(default_factory=list)
    loss_scale: float = 1.0        # the fp16 loss scale in use at the end (1 = no scaling: fp32 / bf16 models)
    skipped_updates: int = 0       # fp16 updates skipped because the scaled gradient overflowed
    secant_factors: list[float] = field(default_factory=list)  # secant: each measured t* (before clipping)


FP16_LOSS_SCALE = 2.0 ** 16  # MSE gradients at the UNet output are ~1e-6: subnormal or zero in fp16 unscaled
SECANT_RANGE = (0.0, 3.0)    # the secant correction may undo the last update or extend it to 3x, no further


def secant_step_factor(prev_res: torch.Tensor, res: torch.Tensor) -> Optional[float]:
    """The multiple t* of the last update that minimises ||residual||^2 under the secant (Gauss-Newton) model.

    To first order the residual is affine along the last update u: r(t) = prev_res + t d, d = res - prev_res
    (so r(0) = prev_res, r(1) = res), and min_t ||r(t)||^2 is at t* = -<prev_res, d> / ||d||^2. t* = 1: the
    update was the right length; > 1: too short; < 1: too long. None when the residual did not move.
    """
    d = res - prev_res
    den, num = torch.stack([d.square().sum(), (prev_res * d).sum()]).tolist()  # one host read, not two
    if not (den > 0 and math.isfinite(den)):
        return None
    return -num / den


def optimize_null_text(
    eps_cond: Callable[[torch.Tensor, float], torch.Tensor],
    eps_uncond: Callable[[torch.Tensor, float, torch.Tensor], torch.Tensor],
    trajectory: torch.Tensor,
    sigmas: torch.Tensor,
    null_init: torch.Tensor,
    config: NullTextConfig = NullTextConfig(),
    *,
    device: Optional[torch.device] = None,
    check_cancel: Callable[[], None] = lambda: None,
    on_step: Optional[Callable[[int, int], None]] = None,
    half_precision: bool = False,
) -> tuple[torch.Tensor, NullTextStats]:
    """Null-text inversion (Mokady et al. 2023, Alg. 1) in k-space; returns ``[N, *null.shape]`` nulls.

    For step i (noisiest first), starting from z = x*_T:
      1. eps_c = eps(z, sigma_i, c_src), once, without gradients;
      2. a fresh Adam on a copy of the previous null (the first starts from ``null_init``),
         lr = 1e-2 (1 - i/100);
      3. up to ``inner_steps`` times: eps = eps_u(null) + w (eps_c - eps_u(null)), guided DDIM step to
         z', loss = MSE(ddpm(z'), ddpm(x*_{i+1})); stop once loss < 1e-5 + i 2e-5;
      4. keep null_i and advance z with the guided step it gives.
    Differences from the reference loop (same maths, less work): the early-stop test is made *before*
    the backward pass (the reference back-propagates and steps once more after the loss it tests), so
    a converged step costs one uncond forward and no backward, and its guided step reuses that
    forward instead of a fresh batched [uncond, cond] forward; eps_c is never recomputed; the null
    and Adam run in fp32 whatever the model's dtype; only the null needs gradients (no weight grads).
    When the model computes in fp16, the backward pass is loss-scaled (dynamic, as mixed-precision
    training does: start at 2^16, halve and skip the update on overflow) and the gradient is unscaled
    before Adam sees it — so Adam's updates are the fp32 ones, and the fp16 backward neither underflows
    (the reason the paper says fp16 optimisation fails) nor overflows. fp32 and bf16 models are not scaled.
    ``half_precision``: the model computes in fp16 even if ``eps_uncond`` returns fp32 (ComfyUI's denoised
    prediction is in the latent's dtype); an fp16 return value also switches scaling on.
    ``eps_uncond`` must be differentiable w.r.t. its embedding argument.

    ``config.secant`` (EditLab; off = the paper): every forward also tells how good the previous update
    was. The step's residual went from r0 (before the update u) to r1 (after); to first order it is affine
    along u, so the best point on that line is at t* u (``secant_step_factor``). The next update is Adam's,
    from where we are, plus (t* - 1) u: the part of the last update that was missing (t* > 1) or too much
    (t* < 1), t* clipped to [0, 3]. No extra model pass (the residuals are the loss's own); Adam, its lr
    schedule and the early-stop rule are unchanged. Where the paper's lr is too short for a model (Adam
    moves every entry by about lr per iteration, however far the optimum is) this reaches a given loss in
    fewer iterations; fp16 updates skipped on overflow are not corrected either.
    """
    config.validate()
    check_schedule(sigmas)
    n = len(sigmas) - 1
    if trajectory.shape[0] != n + 1:
        raise InversionError(f"trajectory has {trajectory.shape[0]} latents for {n + 1} sigma levels")
    device = device or null_init.device
    stats = NullTextStats()
    null = null_init.detach().to(device, torch.float32).clone()
    z = trajectory[0].to(device, torch.float32).clone()
    nulls = []
    for i in range(n):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        target = ddpm(trajectory[i + 1].to(device, torch.float32), sigma_next)
        threshold = config.epsilon + i * config.epsilon_slope
        with torch.no_grad():
            e_c = eps_cond(z, sigma).float()
        stats.forwards += 1
        null = null.detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([null], lr=config.lr * (1.0 - i / config.lr_decay_steps))
        eps = None
        iters = 0
        loss_value = float("nan")
        prev_res = prev_null = correction = None
        for _ in range(config.inner_steps):
            check_cancel()
            with torch.enable_grad():
                raw = eps_uncond(z, sigma, null)
                e_u = raw.float()
                stats.forwards += 1
                guided = e_u + config.guidance * (e_c - e_u)
                z_next = z + (sigma_next - sigma) * guided
                res = ddpm(z_next, sigma_next) - target
                loss = res.square().mean()  # = mse_loss(ddpm(z'), target)
                loss_value = float(loss.detach())
                if config.secant:
                    correction = None
                    t = None if prev_res is None else secant_step_factor(prev_res, res.detach())
                    if t is not None:
                        stats.secant_factors.append(t)
                        t = min(max(t, SECANT_RANGE[0]), SECANT_RANGE[1])
                        correction = (t - 1.0) * (null.detach() - prev_null)
                    prev_res, prev_null = res.detach(), null.detach().clone()
                if loss_value < threshold:
                    eps = guided.detach()
                    break
                opt.zero_grad(set_to_none=True)
                if stats.loss_scale == 1.0 and (half_precision or raw.dtype == torch.float16):
                    stats.loss_scale = FP16_LOSS_SCALE  # once; the overflow rule below only lowers it
                (loss * stats.loss_scale if stats.loss_scale > 1.0 else loss).backward()
            stats.backwards += 1
            iters += 1
            if stats.loss_scale > 1.0 and null.grad is not None:
                null.grad.div_(stats.loss_scale)
                if not torch.isfinite(null.grad).all():  # overflow in the fp16 backward: skip, scale down
                    stats.loss_scale = max(stats.loss_scale / 2.0, 2.0)
                    stats.skipped_updates += 1
                    continue
            opt.step()
            if correction is not None:
                with torch.no_grad():
                    null.add_(correction)
        if eps is None:  # not converged within inner_steps (or none allowed): one more forward
            check_cancel()
            with torch.no_grad():
                e_u = eps_uncond(z, sigma, null.detach()).float()
            stats.forwards += 1
            eps = e_u + config.guidance * (e_c - e_u)
        stats.losses.append(loss_value)
        stats.iterations.append(iters)
        nulls.append(null.detach().cpu())
        with torch.no_grad():
            z = z + (sigma_next - sigma) * eps
        if on_step is not None:
            on_step(i + 1, n)
    return torch.stack(nulls), stats


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

    def validate(self) -> "Inversion":
        check_schedule(self.sigmas)
        if self.trajectory.ndim < 3 or self.trajectory.shape[0] != len(self.sigmas):
            raise InversionError(
                f"trajectory shape {tuple(self.trajectory.shape)} does not match {len(self.sigmas)} sigma levels")
        for name in ("trajectory", "source_embedding", "null_embeddings", "source_pooled"):
            t = getattr(self, name)
            if t is not None and not torch.isfinite(t).all():
                raise InversionError(f"the inversion's {name} contains NaN or inf")
        if self.null_embeddings is not None and self.null_embeddings.shape[0] != self.steps:
            raise InversionError(f"{self.null_embeddings.shape[0]} null embeddings for {self.steps} steps")
        return self

    def step_index(self, sigma: float, rel_tol: float = 1e-4) -> int:
        """Index i with sigmas[i] == sigma (a sampler evaluating at a level the inversion never saw is refused)."""
        diffs = (self.sigmas[:-1] - sigma).abs()
        i = int(diffs.argmin())
        if diffs[i] > rel_tol * max(1.0, abs(sigma)):
            raise InversionError(
                f"the sampler evaluated the model at sigma {sigma:.5g}, which is not a level of the inversion's "
                f"schedule ({self.steps} steps, {float(self.sigmas[0]):.4g} -> 0). Use the SIGMAS output of "
                "DDIM Invert and a single-evaluation sampler (euler / ddim)"
            )
        return i

    def check_schedule_matches(self, sigmas: torch.Tensor) -> int:
        """The sampling schedule must be the inversion's, or a tail of it; returns the start index."""
        s = sigmas.detach().float().cpu()
        n = len(s)
        if n < 2 or n > len(self.sigmas):
            raise InversionError(
                f"the sampling schedule has {n - 1} steps but the inversion has {self.steps}; connect DDIM Invert's "
                "SIGMAS output to the sampler")
        start = len(self.sigmas) - n
        if not torch.allclose(s, self.sigmas[start:].float(), rtol=1e-4, atol=1e-6):
            raise InversionError(
                "the sampling schedule does not match the inversion's (different scheduler, steps or model "
                "sampling); connect DDIM Invert's SIGMAS output to the sampler")
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
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> "Inversion":
        if (meta or {}).get("format") != FORMAT:
            raise InversionError("not an EditLab inversion file (no 'editlab.inversion/1' format tag)")
        missing = [k for k in ("sigmas", "trajectory", "source_embedding") if k not in tensors]
        if missing:
            raise InversionError(f"the inversion file is incomplete: missing {', '.join(missing)}")
        try:
            extra = json.loads(meta.get("meta", "{}"))
            guidance = float(meta.get("guidance", "1.0"))
        except ValueError as exc:
            raise InversionError(f"the inversion file's metadata is corrupt ({exc})") from exc
        return cls(sigmas=tensors["sigmas"], trajectory=tensors["trajectory"],
                   source_embedding=tensors["source_embedding"], model_id=meta.get("model_id", ""),
                   guidance=guidance, scaling=meta.get("scaling", "reference"),
                   source_pooled=tensors.get("source_pooled"), null_embeddings=tensors.get("null_embeddings"),
                   meta=extra).validate()


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: Optional[float] = None) -> float:
    """Peak signal-to-noise ratio in dB; ``data_range`` defaults to the reference's (b's) value range."""
    a, b = a.float(), b.float()
    if a.shape != b.shape:
        raise InversionError(f"cannot compare shapes {tuple(a.shape)} and {tuple(b.shape)}")
    rng = float(b.max() - b.min()) if data_range is None else float(data_range)
    mse = float(((a - b) ** 2).mean())
    if mse == 0.0:
        return float("inf")
    return 10.0 * math.log10(rng**2 / mse)
