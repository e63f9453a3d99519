"""FlowEdit: inversion-free text-based editing with flow models (Kulikov et al., 2025; docs/methods.md §11).

Flow parametrisation (ComfyUI's ``CONST``): ``x = (1 - sigma) x0 + sigma n``, the network's velocity
``v ~ n - x0 = dx/dsigma``. A schedule ``sigmas`` is descending and ends at 0; step ``i`` goes from
``sigmas[i]`` to ``sigmas[i + 1]``; ``T = len(sigmas) - 1`` steps.

FlowEdit walks a *difference* ODE that starts at the source image instead of at noise:

- skip the first ``T - n_max`` steps: ``z = x_src`` at ``sigma = sigmas[T - n_max]``;
- each FlowEdit step (while more than ``n_min`` steps remain), for each of ``n_avg`` draws ``n ~ N(0, I)``:
  ``z_src = (1 - t) x_src + t n``, ``z_tar = z_src + (z - x_src)``, and
  ``z <- z + (t_next - t) * mean(v_tar(z_tar, t) - v_src(z_src, t))``
  (each velocity with its own condition and guidance scale);
- the last ``n_min`` steps are ordinary sampling of the target from
  ``x_tar = z + (1 - t) x_src + t n - x_src`` (one fresh draw), ``x_tar <- x_tar + (t_next - t) v_tar``.

These are the authors' ``FlowEditSD3`` / ``FlowEditFLUX`` loops (fallenshock/FlowEdit, FlowEdit_utils.py),
with their published settings in :data:`PRESETS`. ``z_tar`` is written ``z_src + (z - x_src)`` (the
same sum as the paper's ``z + z_src - x_src``) so that while ``z == x_src`` it *is* ``z_src`` bit for bit:
an edit whose source and target velocities agree then returns the source exactly, not to rounding.
No ComfyUI import.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..errors import EditLabError

# (z_src, z_tar, sigma) -> (v_src(z_src, sigma), v_tar(z_tar, sigma))
VelocityPair = Callable[[torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]
# (x, sigma) -> v_tar(x, sigma)
Velocity = Callable[[torch.Tensor, float], torch.Tensor]
Noise = Callable[[], torch.Tensor]


@dataclass(frozen=True)
class Preset:
    """The authors' published FlowEdit settings for one model (SD3_exp.yaml / FLUX_exp.yaml)."""

    steps: int
    n_max: int
    n_min: int
    n_avg: int
    source_scale: float
    target_scale: float
    seed: int


PRESETS: dict[str, Preset] = {
    # SD3-medium, real CFG: source 3.5, target 13.5, 50 steps, edit over the last 33.
    "SD3": Preset(steps=50, n_max=33, n_min=0, n_avg=1, source_scale=3.5, target_scale=13.5, seed=42),
    # Flux-dev (guidance-distilled): the two scales are the guidance *embedding* values, no CFG pass.
    "FLUX": Preset(steps=28, n_max=24, n_min=0, n_avg=1, source_scale=1.5, target_scale=5.5, seed=10),
}


def check_settings(steps: int, n_max: int, n_min: int, n_avg: int) -> int:
    """The number of steps FlowEdit will walk (``n_max`` capped at ``steps``, as the authors' loop does).

    ``n_min`` must be below ``n_max``: FlowEdit needs at least one difference step, else the result is
    a plain SDEdit of the target (use SDEdit for that).
    """
    if steps < 1:
        raise EditLabError(f"FlowEdit needs a schedule with at least one step (got {steps})")
    if n_max < 1:
        raise EditLabError(f"n_max must be at least 1 (got {n_max}): it is how many of the {steps} steps edit")
    if n_avg < 1:
        raise EditLabError(f"n_avg must be at least 1 (got {n_avg})")
    walked = min(n_max, steps)
    if not 0 <= n_min < walked:
        raise EditLabError(
            f"n_min ({n_min}) must be at least 0 and below n_max ({walked} of the schedule's {steps} steps): the "
            "last n_min steps are ordinary sampling, the FlowEdit steps come before them. Lower n_min or raise n_max")
    return walked


@torch.no_grad()
def flowedit(velocities: VelocityPair, target_velocity: Velocity, x_src: torch.Tensor, sigmas: torch.Tensor,
             n_max: int, n_min: int = 0, n_avg: int = 1, noise: Optional[Noise] = None,
             on_step: Optional[Callable[[int, torch.Tensor], None]] = None) -> torch.Tensor:
    """The edited latent (docs/methods.md §11, Kulikov et al. 2025, Algorithm 1).

    ``velocities(z_src, z_tar, t)`` returns the source and target velocities (each with its own
    condition and guidance); ``target_velocity(x, t)`` the target's alone (the ``n_min`` tail);
    ``noise()`` one draw shaped like ``x_src`` (default ``torch.randn_like``); ``on_step(i, z)`` after
    every walked step ``i`` (an index into ``sigmas``).
    """
    levels = [float(s) for s in sigmas]
    steps = len(levels) - 1
    walked = check_settings(steps, n_max, n_min, n_avg)
    draw = noise if noise is not None else (lambda: torch.randn_like(x_src))
    x_src = x_src.to(torch.promote_types(x_src.dtype, torch.float32))  # half latents are stepped in float32
    z = x_src.clone()
    x_tar: Optional[torch.Tensor] = None
    for i in range(steps - walked, steps):
        t, t_next = levels[i], levels[i + 1]
        if steps - i > n_min:
            delta = torch.zeros_like(x_src)
            for _ in range(n_avg):
                z_src = (1.0 - t) * x_src + t * draw().to(x_src)
                z_tar = z_src + (z - x_src)  # == z_src exactly while z == x_src (see the module docstring)
                v_src, v_tar = velocities(z_src, z_tar, t)
                delta += (v_tar.to(delta) - v_src.to(delta)) / n_avg
            z = z + (t_next - t) * delta
        else:
            if x_tar is None:  # the first of the last n_min steps: SDEdit-style hand-over to the target
                x_tar = z + ((1.0 - t) * x_src + t * draw().to(x_src)) - x_src
            x_tar = x_tar + (t_next - t) * target_velocity(x_tar, t).to(x_tar)
        if on_step is not None:
            on_step(i, z if x_tar is None else x_tar)
    return z if x_tar is None else x_tar
