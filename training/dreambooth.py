"""DreamBooth (Ruiz et al., CVPR 2023): fine-tuning with class-specific prior preservation.

Pure torch; the node layer supplies the model as a callable. Paper Eq. 2, in ComfyUI's parametrisation
(docs/methods.md §8):

    L = mean_i w(s_i) ||D(x_i(s_i), s_i, c) - x_i||^2  +  lambda * mean_j w(s_j) ||D(x_pr_j(s_j), s_j, c_pr) - x_pr_j||^2

with ``x(s) = noise_scaling(s, e, x0)`` and ``D`` the model's denoised (x0) prediction. The weight ``w``
picks the regression target: ``model`` -> ``w = 1 / c_out(s)^2``, the MSE on the model's own output
(eps for eps-models, v for v-models, velocity for flow models: DreamBooth's and diffusers' loss), where
``D = c_skip x + c_out * output``; ``x0`` -> ``w = 1`` (ComfyUI's trainer's x0-MSE).

Each step draws ``batch_size`` instance rows and as many class rows (1:1) into one forward. The two
streams have their own seeded generators per step, so a run with ``lambda = 0`` (which skips the class
rows) draws exactly what an instance-only run draws, and a run resumed at step k draws what an
uninterrupted run draws from step k on.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..errors import EditLabError

LOSS_TARGETS = ("model", "x0")
INSTANCE, PRIOR = 0, 1


@dataclass(frozen=True)
class DreamBoothConfig:
    steps: int
    prior_loss_weight: float = 1.0
    batch_size: int = 1
    seed: int = 0
    loss_target: str = "model"
    save_every: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise EditLabError(f"steps must be at least 1, got {self.steps}")
        if self.batch_size < 1:
            raise EditLabError(f"batch_size must be at least 1, got {self.batch_size}")
        if not math.isfinite(self.prior_loss_weight) or self.prior_loss_weight < 0:
            raise EditLabError(f"prior_loss_weight must be a finite number >= 0, got {self.prior_loss_weight}")
        if self.loss_target not in LOSS_TARGETS:
            raise EditLabError(f"loss_target: {self.loss_target!r} is not one of {list(LOSS_TARGETS)}")


@dataclass
class Draw:
    """One stream's rows for one step: which images, at which noise levels, with which noise."""
    index: torch.Tensor   # [k] long
    u: torch.Tensor       # [k] uniform in [0, 1): the noise level as a fraction of the schedule
    noise: torch.Tensor   # [k, C, H, W]


def _generator(seed: int, stream: int, step: int) -> torch.Generator:
    # A generator per (stream, step): the draw does not depend on what other streams or steps drew.
    return torch.Generator().manual_seed((seed * 1_000_003 + stream * 7_919 + step * 104_729) % (2**63 - 1))


def draw_rows(latents: torch.Tensor, k: int, seed: int, stream: int, step: int) -> Draw:
    """``k`` rows of ``latents`` (with replacement when ``k`` exceeds the set), levels and noise."""
    g = _generator(seed, stream, step)
    n = latents.shape[0]
    index = torch.randperm(n, generator=g)[:k] if k <= n else torch.randint(0, n, (k,), generator=g)
    u = torch.rand(k, generator=g)
    noise = torch.randn((k, *latents.shape[1:]), generator=g)
    return Draw(index=index, u=u, noise=noise)


def target_weight(c_out: torch.Tensor, loss_target: str) -> torch.Tensor:
    """Per-row loss weight that turns an x0-space squared error into the chosen target's."""
    if loss_target == "x0":
        return torch.ones_like(c_out)
    return 1.0 / c_out.float().pow(2).clamp_min(1e-12)


def prior_preservation_loss(x0_pred: torch.Tensor, x0: torch.Tensor, weight: torch.Tensor, n_instance: int,
                            prior_loss_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, instance, prior): rows ``[:n_instance]`` are instance rows, the rest class-prior rows."""
    per_row = (x0_pred.float() - x0.float()).pow(2).flatten(1).mean(1) * weight.float()
    instance = per_row[:n_instance].mean()
    if per_row.shape[0] > n_instance:
        prior = per_row[n_instance:].mean()
    else:
        prior = per_row.new_zeros(())
    return instance + prior_loss_weight * prior, instance, prior


@dataclass
class LossHistory:
    total: list[float] = field(default_factory=list)
    instance: list[float] = field(default_factory=list)
    prior: list[float] = field(default_factory=list)

    def as_loss_map(self) -> dict[str, list[float]]:
        return {"loss": list(self.total), "instance": list(self.instance), "prior": list(self.prior)}


@dataclass
class Model:
    """What the loop needs of the model, as callables (ComfyUI's model_sampling and denoiser)."""
    predict_x0: Callable[[torch.Tensor, torch.Tensor, list[tuple[int, int]]], torch.Tensor]
    sigma_of: Callable[[torch.Tensor], torch.Tensor]                       # u in [0,1) -> sigma
    noise_scaling: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (sigma, noise, x0) -> x
    c_out: Callable[[torch.Tensor], torch.Tensor]                          # sigma -> c_out


def train(model: Model, optimizer: torch.optim.Optimizer, instance: torch.Tensor,
          class_latents: Optional[torch.Tensor], config: DreamBoothConfig, *, start_step: int = 0,
          history: Optional[LossHistory] = None, device: torch.device | str = "cpu",
          on_step: Callable[[int, float, float, float], None] = lambda *a: None,
          on_checkpoint: Callable[[int, LossHistory], None] = lambda *a: None,
          check_cancel: Callable[[], None] = lambda: None) -> LossHistory:
    """DreamBooth's step loop: draw pairs, one forward, Eq. 2, one optimizer step; checkpoints every
    ``save_every`` steps. ``predict_x0(x, sigma, rows)`` gets rows as (stream, image index) pairs so the
    caller can build each row's conditioning (instance prompt for stream 0, class prompt for stream 1)."""
    use_prior = config.prior_loss_weight > 0
    if use_prior and (class_latents is None or class_latents.shape[0] == 0):
        raise EditLabError("prior_loss_weight > 0 needs class images: connect Class Prior Images "
                           "(or set prior_loss_weight to 0 for instance-only fine-tuning)")
    history = history or LossHistory()
    k = config.batch_size
    for step in range(start_step, config.steps):
        check_cancel()
        # 1. draw the instance rows and, 1:1, the class rows (separate streams)
        draws = [(INSTANCE, instance, draw_rows(instance, k, config.seed, INSTANCE, step))]
        if use_prior:
            draws.append((PRIOR, class_latents, draw_rows(class_latents, k, config.seed, PRIOR, step)))
        x0 = torch.cat([src[d.index] for _, src, d in draws]).to(device)
        noise = torch.cat([d.noise for _, _, d in draws]).to(device, x0.dtype)
        sigma = model.sigma_of(torch.cat([d.u for _, _, d in draws])).to(device)
        rows = [(stream, int(i)) for stream, _, d in draws for i in d.index]
        # 2. noise them to their levels and predict x0 in one forward
        x = model.noise_scaling(sigma, noise, x0)
        x0_pred = model.predict_x0(x, sigma, rows)
        # 3. Eq. 2 in the chosen target, then one optimizer step
        total, inst, prior = prior_preservation_loss(x0_pred, x0, target_weight(model.c_out(sigma), config.loss_target),
                                                     k, config.prior_loss_weight)
        if not torch.isfinite(total):
            raise EditLabError(f"the loss became {float(total)} at step {step + 1}; lower the learning rate "
                               "or train in fp32")
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        history.total.append(float(total.detach()))
        history.instance.append(float(inst.detach()))
        history.prior.append(float(prior.detach()))
        on_step(step, history.total[-1], history.instance[-1], history.prior[-1])
        if config.save_every and (step + 1) % config.save_every == 0 and step + 1 < config.steps:
            on_checkpoint(step + 1, history)
    return history
