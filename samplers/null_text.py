"""Null-text inversion (Mokady et al., CVPR 2023, Algorithm 1; docs/methods.md §4), in k-space.

``optimize_null_text`` follows the paper's Algorithm 1 step by step; the engineering around it lives in
small named helpers: the early-stop test (:func:`early_stop_threshold`), the fp16 loss scaler
(:class:`LossScaler`) and EditLab's optional secant correction (:class:`SecantCorrection`). No ComfyUI
imports.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..errors import EditLabError
from . import family as fam
from .family import K_SPACE, ModelFamily
from .inversion import check_schedule

EpsCond = Callable[[torch.Tensor, float], torch.Tensor]
EpsUncond = Callable[[torch.Tensor, float, torch.Tensor], torch.Tensor]

FP16_LOSS_SCALE = 2.0 ** 16  # MSE gradients at the UNet output are ~1e-6: subnormal or zero in fp16 unscaled
SECANT_RANGE = (0.0, 3.0)    # the secant correction may undo the last update or extend it to 3x, no further


@dataclass
class NullTextConfig:
    """Mokady et al. 2023 hyper-parameters (docs/methods.md §4)."""

    guidance: float = 7.5
    inner_steps: int = 10
    epsilon: float = 1e-5          # early stop when loss < epsilon + i * epsilon_slope
    epsilon_slope: float = 2e-5
    lr: float = 1e-2               # Adam lr at step i: lr * (1 - i / lr_decay_steps)
    lr_decay_steps: float = 100.0
    secant: bool = False           # EditLab's secant correction of each Adam update (see SecantCorrection)

    def validate(self) -> None:
        if self.inner_steps < 0:
            raise EditLabError(f"inner steps must be >= 0, got {self.inner_steps}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise EditLabError(f"learning rate must be a positive number, got {self.lr}")
        if not math.isfinite(self.guidance):
            raise EditLabError(f"guidance must be finite, got {self.guidance}")


@dataclass
class NullTextStats:
    forwards: int = 0
    backwards: int = 0
    losses: list[float] = field(default_factory=list)
    iterations: list[int] = field(default_factory=list)
    loss_scale: float = 1.0        # the fp16 loss scale in use at the end (1 = no scaling: fp32 / bf16 models)
    skipped_updates: int = 0       # fp16 updates skipped because the scaled gradient overflowed
    secant_factors: list[float] = field(default_factory=list)  # secant: each measured t* (before clipping)


def early_stop_threshold(config: NullTextConfig, i: int) -> float:
    """Algorithm 1's early stop: step i's optimisation ends once the loss is below ``epsilon + i * slope``."""
    return config.epsilon + i * config.epsilon_slope


def learning_rate(config: NullTextConfig, i: int) -> float:
    """Algorithm 1's Adam learning rate at step i: ``lr (1 - i / 100)``."""
    return config.lr * (1.0 - i / config.lr_decay_steps)


class LossScaler:
    """Dynamic loss scaling for a model that computes in fp16 (as mixed-precision training does).

    The paper reports that fp16 optimisation fails: the MSE gradient at the UNet output underflows in the
    fp16 backward. The loss is multiplied by 2^16 before ``backward`` and the gradient divided back before
    Adam sees it, so Adam's updates are the fp32 ones; on overflow the update is skipped and the scale
    halved. fp32 and bf16 models are never scaled (the scale stays 1).
    """

    def __init__(self, stats: NullTextStats):
        self.stats = stats  # the scale and the skipped-update count are reported there

    def backward(self, loss: torch.Tensor, fp16: bool) -> None:
        if self.stats.loss_scale == 1.0 and fp16:
            self.stats.loss_scale = FP16_LOSS_SCALE  # once; the overflow rule below only lowers it
        scale = self.stats.loss_scale
        (loss * scale if scale > 1.0 else loss).backward()

    def unscale(self, param: torch.Tensor) -> bool:
        """Unscale ``param.grad`` in place; False (skip the update) when the scaled backward overflowed."""
        scale = self.stats.loss_scale
        if scale > 1.0 and param.grad is not None:
            param.grad.div_(scale)
            if not torch.isfinite(param.grad).all():
                self.stats.loss_scale = max(scale / 2.0, 2.0)
                self.stats.skipped_updates += 1
                return False
        return True


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


class SecantCorrection:
    """EditLab's secant correction of each Adam update (``config.secant``; off = the paper).

    Every forward tells how good the previous update u was: the step's residual went from r0 (before u)
    to r1 (after); to first order it is affine along u, so the best point on that line is at t* u
    (:func:`secant_step_factor`). The next update is Adam's plus (t* - 1) u: the part of the last update
    that was missing (t* > 1) or too much (t* < 1), t* clipped to ``SECANT_RANGE``. No extra model pass
    (the residuals are the loss's own); Adam, its lr schedule and the early-stop rule are unchanged.
    An update skipped on fp16 overflow is not corrected either.
    """

    def __init__(self, enabled: bool, factors: list[float]):
        self.enabled = enabled
        self.factors = factors  # every measured t*, before clipping
        self.start_step()

    def start_step(self) -> None:
        """A fresh Adam per step: the residual of the previous step says nothing about this one."""
        self.prev_res: Optional[torch.Tensor] = None
        self.prev_null: Optional[torch.Tensor] = None
        self.correction: Optional[torch.Tensor] = None

    def observe(self, res: torch.Tensor, null: torch.Tensor) -> None:
        """Measure t* for the update that led to ``null`` (residual ``res``) and remember this point."""
        if not self.enabled:
            return
        self.correction = None
        t = None if self.prev_res is None else secant_step_factor(self.prev_res, res.detach())
        if t is not None:
            self.factors.append(t)
            t = min(max(t, SECANT_RANGE[0]), SECANT_RANGE[1])
            self.correction = (t - 1.0) * (null.detach() - self.prev_null)
        self.prev_res, self.prev_null = res.detach(), null.detach().clone()

    @torch.no_grad()
    def apply(self, null: torch.Tensor) -> None:
        """Add the measured correction after Adam's step."""
        if self.correction is not None:
            null.add_(self.correction)


def _fit_null(i: int, z: torch.Tensor, sigma: float, sigma_next: float, e_c: torch.Tensor, target: torch.Tensor,
              null: torch.Tensor, eps_uncond: EpsUncond, config: NullTextConfig, stats: NullTextStats,
              scaler: LossScaler, secant: SecantCorrection, half_precision: bool,
              check_cancel: Callable[[], None],
              family: ModelFamily = K_SPACE) -> tuple[torch.Tensor, Optional[torch.Tensor], float, int]:
    """Algorithm 1's inner loop for step i: Adam on the null so the guided DDIM step from z lands on the pivot.

    Returns the fitted null, the guided eps of the iteration that met the early stop (None if none did),
    the last loss and the number of updates. The early-stop test comes *before* the backward pass (the
    reference back-propagates and steps once more after the loss it tests): a converged step costs one
    forward and no backward, and its guided step reuses that forward.
    """
    null = null.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([null], lr=learning_rate(config, i))
    secant.start_step()
    threshold = early_stop_threshold(config, i)
    loss_value, iters = float("nan"), 0
    for _ in range(config.inner_steps):
        check_cancel()
        with torch.enable_grad():
            raw = eps_uncond(z, sigma, null)
            stats.forwards += 1
            e_u = raw.float()
            guided = e_u + config.guidance * (e_c - e_u)
            z_next = z + (sigma_next - sigma) * guided
            res = fam.loss_latent(family, z_next, sigma_next) - target
            loss = res.square().mean()  # = mse_loss(ddpm(z'), target)
            loss_value = float(loss.detach())
            secant.observe(res, null)
            if loss_value < threshold:
                return null, guided.detach(), loss_value, iters
            opt.zero_grad(set_to_none=True)
            scaler.backward(loss, fp16=half_precision or raw.dtype == torch.float16)
        stats.backwards += 1
        iters += 1
        if not scaler.unscale(null):
            continue
        opt.step()
        secant.apply(null)
    return null, None, loss_value, iters


def optimize_null_text(
    eps_cond: EpsCond,
    eps_uncond: EpsUncond,
    trajectory: torch.Tensor,
    sigmas: torch.Tensor,
    null_init: torch.Tensor,
    config: NullTextConfig = NullTextConfig(),
    *,
    device: Optional[torch.device] = None,
    check_cancel: Callable[[], None] = lambda: None,
    on_step: Optional[Callable[[int, int], None]] = None,
    half_precision: bool = False,
    family: ModelFamily = K_SPACE,
) -> tuple[torch.Tensor, NullTextStats]:
    """Null-text inversion (Mokady et al. 2023, Algorithm 1) in k-space; returns ``[N, *null.shape]`` nulls.

    For step i (noisiest first), starting from z = x*_T:
      1. eps_c = eps(z, sigma_i, c_src), once, without gradients;
      2. a fresh Adam on a copy of the previous null (the first starts from ``null_init``),
         lr = 1e-2 (1 - i/100) (:func:`learning_rate`);
      3. up to ``inner_steps`` times: eps = eps_u(null) + w (eps_c - eps_u(null)), guided DDIM step to
         z', loss = MSE(ddpm(z'), ddpm(x*_{i+1})); stop once loss < 1e-5 + i 2e-5 (:func:`_fit_null`);
      4. keep null_i and advance z with the guided step it gives.
    Differences from the reference (same maths, less work): the early stop is tested before the backward
    pass; eps_c is never recomputed; the null and Adam run in fp32 whatever the model's dtype; only the
    null needs gradients. fp16 models are loss-scaled (:class:`LossScaler`); ``half_precision`` says the
    model computes in fp16 even if ``eps_uncond`` returns fp32 (ComfyUI's prediction is in the latent's
    dtype). ``config.secant`` adds EditLab's :class:`SecantCorrection`. ``eps_uncond`` must be
    differentiable w.r.t. its embedding argument. On a flow model with CFG (SD3.x; ``family=FLOW``,
    docs/methods.md §11) eps is the velocity, the step is the same first-order ODE step and the loss is
    measured on the flow latent itself (:func:`family.loss_latent`); guidance-distilled models are refused
    by the node (no unconditional branch).
    """
    if not family.has_uncond:
        raise EditLabError(f"null-text inversion needs an unconditional branch; a {family} model has none")
    config.validate()
    check_schedule(sigmas)
    n = len(sigmas) - 1
    if trajectory.shape[0] != n + 1:
        raise EditLabError(f"trajectory has {trajectory.shape[0]} latents for {n + 1} sigma levels")
    device = device or null_init.device
    stats = NullTextStats()
    scaler = LossScaler(stats)
    secant = SecantCorrection(config.secant, stats.secant_factors)
    null = null_init.detach().to(device, torch.float32).clone()
    z = trajectory[0].to(device, torch.float32).clone()
    nulls = []
    for i in range(n):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        target = fam.loss_latent(family, trajectory[i + 1].to(device, torch.float32), sigma_next)
        with torch.no_grad():  # 1.
            e_c = eps_cond(z, sigma).float()
        stats.forwards += 1
        null, eps, loss_value, iters = _fit_null(  # 2.-3.
            i, z, sigma, sigma_next, e_c, target, null, eps_uncond, config, stats, scaler, secant,
            half_precision, check_cancel, family)
        if eps is None:  # not converged within inner_steps (or none allowed): one more forward
            check_cancel()
            with torch.no_grad():
                e_u = eps_uncond(z, sigma, null.detach()).float()
            stats.forwards += 1
            eps = e_u + config.guidance * (e_c - e_u)
        stats.losses.append(loss_value)
        stats.iterations.append(iters)
        nulls.append(null.detach().cpu())  # 4.
        with torch.no_grad():
            z = z + (sigma_next - sigma) * eps
        if on_step is not None:
            on_step(i + 1, n)
    return torch.stack(nulls), stats
