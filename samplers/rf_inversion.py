"""RF-Inversion: inversion and editing with controlled rectified-flow ODEs (Rout et al., ICLR 2025;
docs/methods.md §11).

Written in ComfyUI's flow parametrisation ``x = (1 - sigma) x0 + sigma z`` (``CONST``): the network's
velocity ``u(x, sigma) ~ z - x0 = dx/dsigma`` points toward noise and ``D = x - sigma u``. The paper runs
time from image to noise for the forward ODE (``t = sigma``) and from noise to image for the reverse one
(``t = 1 - sigma``); both are rewritten here on ComfyUI's descending ``sigmas`` (ending at 0).

**Controlled forward ODE** (paper eq. 8, Algorithm 1) from the clean latent ``y0`` toward a fixed noise
sample ``y1 ~ N(0, I)``::

    dY/dsigma = u(Y, sigma) + gamma * (u(Y | y1) - u(Y, sigma)),   u(Y | y1) = (y1 - Y) / (1 - sigma)

``u(Y | y1)`` is the velocity of the straight path from ``Y`` to ``y1``; ``gamma = 0`` is the plain ODE
inversion, ``gamma = 1`` goes straight to ``y1``. First-order (explicit Euler) steps with the velocity at
the current level, as the authors' code does (diffusers ``pipeline_flux_rf_inversion.invert``).

**Controlled reverse ODE** (paper Algorithm 2; the ODE limit of its eq. 17) from the inverted latent back
to an image, pulled toward the source ``y0`` with strength ``eta`` on a window of steps::

    dX/dsigma = (1 - eta_i) u(X, sigma) + eta_i (X - y0) / sigma,   eta_i = eta if start <= i < stop else 0

Equivalently the denoised prediction is blended, ``D_hat = (1 - eta_i) D + eta_i y0`` (because
``X - sigma * (X - y0) / sigma = y0``): a GUIDER can return ``D_hat`` and any sampler integrates the
controlled ODE; ComfyUI's Euler sampler gives the authors' step exactly.

Authors' defaults (diffusers community pipeline / LituRout/RF-Inversion README): 28 steps on Flux-dev,
``gamma = 0.5``, source prompt empty with guidance 0 while inverting, ``eta = 0.9`` (pipeline default 1.0)
over ``start = 0`` to ``stop = 0.25 * 28 = 7`` steps, target guidance 3.5. No ComfyUI import.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..errors import EditLabError

Velocity = Callable[[torch.Tensor, float], torch.Tensor]

# The velocity is read back from ComfyUI's denoised prediction as (x - D) / sigma, which needs sigma > 0:
# the first forward step (from the clean image, sigma 0) evaluates the network at this level instead.
VELOCITY_FLOOR = 1e-3
DEFAULTS = {"steps": 28, "gamma": 0.5, "eta": 0.9, "start_step": 0, "stop_step": 7, "guidance": 3.5}


def check_gamma(gamma: float) -> float:
    if not 0.0 <= float(gamma) <= 1.0:
        raise EditLabError(f"gamma must be in [0, 1] (got {gamma}): 0 = plain ODE inversion, 1 = straight to the noise sample")
    return float(gamma)


def check_window(eta: float, start: int, stop: int) -> None:
    if not 0.0 <= float(eta) <= 1.0:
        raise EditLabError(f"eta must be in [0, 1] (got {eta}): 0 = plain sampling, 1 = pulled all the way to the source")
    if start < 0 or stop < start:
        raise EditLabError(f"the eta window start_step {start} .. stop_step {stop} is empty or negative; "
                           "use 0 <= start_step <= stop_step (steps counted from the noisiest, 0)")


def eta_at(i: int, eta: float, start: int, stop: int) -> float:
    """The controller strength on step ``i`` (the authors': ``eta`` on ``start <= i < stop``, else 0)."""
    return float(eta) if start <= i < stop else 0.0


def controlled_velocity(u: torch.Tensor, y: torch.Tensor, y1: torch.Tensor, sigma: float, gamma: float) -> torch.Tensor:
    """Eq. 8's controlled field ``u + gamma ((y1 - y) / (1 - sigma) - u)`` at level ``sigma`` < 1."""
    return u + gamma * ((y1 - y) / (1.0 - sigma) - u)


def controlled_denoised(denoised: torch.Tensor, y0: torch.Tensor, eta: float) -> torch.Tensor:
    """Algorithm 2's controlled field as a denoised prediction: ``(1 - eta) D + eta y0``."""
    if eta == 0.0:
        return denoised
    return (1.0 - eta) * denoised + eta * y0


@torch.no_grad()
def controlled_forward(velocity: Velocity, y0: torch.Tensor, sigmas: torch.Tensor, gamma: float, y1: torch.Tensor,
                       on_step: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
    """Invert ``y0`` along ``sigmas`` (descending, from at most 1, ending at 0) with eq. 8.

    Returns the trajectory ``[N + 1, *y0.shape]`` in sampling order, as ``ddim_invert`` stores it:
    ``[0]`` is the inverted latent at ``sigmas[0]``, ``[-1]`` is ``y0``; on the CPU, float32.
    """
    gamma = check_gamma(gamma)
    if y1.shape != y0.shape:
        raise EditLabError(f"the noise sample {tuple(y1.shape)} does not match the latent {tuple(y0.shape)}")
    levels = [float(s) for s in sigmas.flip(0)]
    if len(levels) < 2 or levels[0] != 0.0 or levels[-1] > 1.0:
        raise EditLabError(f"RF-Inversion needs a schedule of at least one step from at most 1 down to 0 "
                           f"(got {levels[-1]:.4g} -> {levels[0]:.4g})")
    y = y0.to(torch.promote_types(y0.dtype, torch.float32))
    y1 = y1.to(y)
    traj = [y.detach().cpu().float()]
    n = len(levels) - 1
    for k in range(n):
        s, s_next = levels[k], levels[k + 1]
        u = velocity(y, max(s, VELOCITY_FLOOR)).to(y)
        y = y + (s_next - s) * controlled_velocity(u, y, y1, s, gamma)
        traj.append(y.detach().cpu().float())
        if on_step is not None:
            on_step(k + 1, n)
    return torch.stack(traj[::-1])


@torch.no_grad()
def controlled_reverse(velocity: Velocity, x: torch.Tensor, y0: torch.Tensor, sigmas: torch.Tensor, eta: float,
                       start: int, stop: int) -> torch.Tensor:
    """Algorithm 2 with Euler steps (what the RF-Inversion guider + ComfyUI's euler sampler compute)."""
    check_window(eta, start, stop)
    levels = [float(s) for s in sigmas]
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    for i in range(len(levels) - 1):
        s, s_next = levels[i], levels[i + 1]
        denoised = x - s * velocity(x, s).to(x)
        denoised = controlled_denoised(denoised, y0.to(x), eta_at(i, eta, start, stop))
        x = x + (s_next - s) * (x - denoised) / s
    return x
