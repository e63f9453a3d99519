"""The one place that knows the model families and their noise conventions (docs/methods.md §11).

ComfyUI runs two parametrisations of a noisy latent at level ``sigma`` (``x0`` clean, ``z ~ N(0, I)``):

- **k-space** (EPS / V-prediction: SD1.x, SD2.x, SDXL; ``comfy.model_sampling.EPS``):
  ``x = x0 + sigma * z``, sigma in (0, sigma_max];
- **flow** (rectified flow: SD3.x, Flux; ``comfy.model_sampling.CONST``):
  ``x = (1 - sigma) * x0 + sigma * z``, sigma in (0, 1]; the network predicts a velocity
  ``v ~ z - x0`` and ComfyUI's denoised prediction is ``D = x - sigma * v``.

In both, ``d = (x - D) / sigma`` is the derivative ``dx/dsigma`` of the sampling ODE (k-diffusion's
``to_d``): on k-space it is the noise prediction ``eps``; on flow it is the velocity ``v`` itself
(``x - D = sigma * v``). So the first-order ODE step ``x' = x + (sigma' - sigma) * d`` (ComfyUI's Euler
sampler, DDIM with eta 0) is shared; what differs is how noise is added (``noise``), how the noise is
read back from ``D`` (``noise_from_denoised``) and how sigma maps to the k-space level
(``k_sigma``: ``sigma / (1 - sigma)`` on flow, because ``x / (1 - sigma) = x0 + sigma / (1 - sigma) z``,
which is ComfyUI's ``CONST.inverse_noise_scaling``).

A *guidance-distilled* flow model (Flux-dev: the CFG scale is an input of the network, there is no
unconditional branch to contrast with) is the flow family with ``has_uncond = False``: null-text and
negative-prompt inversion and dual CFG do not apply to it.

No ComfyUI import: ``nodes/common.py: model_family`` decides the family from ComfyUI's objects.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import EditLabError

Level = float | torch.Tensor


@dataclass(frozen=True)
class ModelFamily:
    """A model family: its name, whether it is rectified flow, whether it has an unconditional branch."""

    name: str
    flow: bool
    has_uncond: bool = True

    def __str__(self) -> str:
        return self.name


K_SPACE = ModelFamily("k-space (eps / v-prediction)", flow=False)
FLOW = ModelFamily("flow-matching (rectified flow)", flow=True)
FLOW_DISTILLED = ModelFamily("guidance-distilled flow-matching", flow=True, has_uncond=False)
FAMILIES: tuple[ModelFamily, ...] = (K_SPACE, FLOW, FLOW_DISTILLED)


def _level(sigma: Level, like: torch.Tensor) -> Level:
    """A scalar stays a Python float; a per-row tensor broadcasts over the latent's trailing dims."""
    if isinstance(sigma, torch.Tensor):
        if sigma.numel() == 1:
            return sigma.reshape(()).to(like.dtype)
        return sigma.reshape([-1] + [1] * (like.ndim - 1)).to(like.dtype)
    return float(sigma)


def noise(family: ModelFamily, x0: torch.Tensor, z: torch.Tensor, sigma: Level) -> torch.Tensor:
    """The marginal at level ``sigma``: ``x0 + sigma z`` (k-space) or ``(1 - sigma) x0 + sigma z`` (flow).

    docs/methods.md §1 (SDEdit perturbation), §2 (known-region re-noising), §11 (flow). Matches ComfyUI's
    ``EPS.noise_scaling`` (``max_denoise=False``) and ``CONST.noise_scaling``.
    """
    if z.shape != x0.shape:
        raise EditLabError(f"noise shape {tuple(z.shape)} does not match latent shape {tuple(x0.shape)}")
    s = _level(sigma, x0)
    if family.flow:
        return (1.0 - s) * x0 + s * z
    return x0 + s * z


def blend(mask: torch.Tensor, x: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """Known-region paste ``m x + (1 - m) known`` (1 = regenerate, ComfyUI's convention; §2). Family-free."""
    return mask * x + (1.0 - mask) * known


def renoise_known(family: ModelFamily, guide: torch.Tensor, z: torch.Tensor, sigma: Level,
                  mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x`` with its known region (mask 0) replaced by the guide noised to ``sigma`` in the family's marginal."""
    return blend(mask, x, noise(family, guide, z, sigma))


def derivative(x: torch.Tensor, denoised: torch.Tensor, sigma: Level) -> torch.Tensor:
    """``d = (x - D) / sigma``: eps on k-space, the velocity ``v`` on flow (ComfyUI's ``to_d``; §3, §11)."""
    return (x - denoised) / _level(sigma, x)


velocity_from_denoised = derivative


def denoised_from_derivative(x: torch.Tensor, d: torch.Tensor, sigma: Level) -> torch.Tensor:
    """``D = x - sigma d`` (k-space: from eps; flow: from the velocity, ``CONST.calculate_denoised``)."""
    return x - _level(sigma, x) * d


def noise_from_denoised(family: ModelFamily, x: torch.Tensor, denoised: torch.Tensor, sigma: Level) -> torch.Tensor:
    """The noise ``z`` that explains ``x`` given ``D``: ``(x - D) / sigma`` or ``(x - (1 - sigma) D) / sigma``."""
    s = _level(sigma, x)
    if family.flow:
        return (x - (1.0 - s) * denoised) / s
    return (x - denoised) / s


def ode_step(x: torch.Tensor, d: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """First-order step of the sampling ODE ``x' = x + (sigma' - sigma) d`` (§3, §11).

    With ``sigma' > sigma`` it is DDIM inversion on k-space and the first-order flow inversion
    ``x' = x + (sigma' - sigma) v`` on flow; with ``sigma' < sigma`` it is ComfyUI's Euler step.
    """
    return x + (float(sigma_next) - float(sigma)) * d


def k_sigma(family: ModelFamily, sigma: float) -> float:
    """The k-space level of ``sigma``: itself, or ``sigma / (1 - sigma)`` on flow (inf at sigma = 1)."""
    sigma = float(sigma)
    if not family.flow:
        return sigma
    return math.inf if sigma >= 1.0 else sigma / (1.0 - sigma)


def to_k_space(family: ModelFamily, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """``x / (1 - sigma)`` on flow (= ``CONST.inverse_noise_scaling``): then ``x = x0 + k_sigma z``."""
    if not family.flow:
        return x
    if float(sigma) >= 1.0:
        raise EditLabError("a flow latent at sigma = 1 is pure noise and has no k-space counterpart")
    return x / (1.0 - float(sigma))


def from_k_space(family: ModelFamily, x_k: torch.Tensor, sigma: float) -> torch.Tensor:
    """Inverse of :func:`to_k_space` at the flow level ``sigma``: ``(1 - sigma) x_k``."""
    return (1.0 - float(sigma)) * x_k if family.flow else x_k


def posterior_step(family: ModelFamily, x: torch.Tensor, denoised: torch.Tensor, sigma: float,
                   sigma_next: float, z: Optional[torch.Tensor]) -> torch.Tensor:
    """One stochastic reverse step that keeps the family's marginal (the DDPM posterior, eta = 1).

    In k-space levels ``s = k_sigma(sigma)``, ``s' = k_sigma(sigma')``, ``r = s' / s``: the Gaussian
    posterior of ``x'`` given ``x`` and ``x0 = D`` is ``x0 + r^2 (x - x0) + s' sqrt(1 - r^2) z``
    (k-diffusion's ancestral step with ``sigma_down = s'^2 / s``). Mapped to flow by ``(1 - sigma')``:

        x' = (1 - sigma') [D + r^2 (x / (1 - sigma) - D)] + (1 - sigma') s' sqrt(1 - r^2) z

    which is finite at sigma = 1 (r = 0: ``x' = (1 - sigma') D + sigma' z``). For a point-mass data set
    (exact ``D``) the marginal ``(1 - sigma') x0 + sigma' z`` holds exactly at every step; in general the
    step is a consistent discretisation of the reverse SDE (docs/methods.md §1, §11). ``z=None``: the
    deterministic ODE step instead.
    """
    if sigma_next == 0.0:
        return denoised
    if z is None:
        return ode_step(x, derivative(x, denoised, sigma), sigma, sigma_next)
    s, s_next = k_sigma(family, sigma), k_sigma(family, sigma_next)
    if math.isinf(s):  # from pure noise the posterior forgets x: r = 0
        r2, mean_k = 0.0, denoised
    else:
        r2 = (s_next / s) ** 2
        mean_k = denoised + r2 * (to_k_space(family, x, sigma) - denoised)
    return from_k_space(family, mean_k + s_next * math.sqrt(max(0.0, 1.0 - r2)) * z, sigma_next)


# A flow latent pre-noised to sigma = 1 cannot be handed to a ComfyUI sampler with noise disabled: the
# sampler starts from ``noise_scaling(sigma0, 0, latent) = (1 - sigma0) * latent``, which is 0 at sigma 1.
# Where EditLab hands such a latent over (SDE Perturb, DDIM Invert) the top flow level is capped here,
# 1 - 2^-10: the start keeps 0.1 % of the clean latent, and the stored latent ``x / (1 - sigma0)`` stays
# exactly representable in float32.
FLOW_SIGMA_CAP = 1.0 - 2.0 ** -10


def cap_start(family: ModelFamily, sigma: float) -> float:
    """The start level a pre-noised latent can be sampled from: ``min(sigma, FLOW_SIGMA_CAP)`` on flow."""
    return min(float(sigma), FLOW_SIGMA_CAP) if family.flow else float(sigma)


def inversion_input_scale(family: ModelFamily, scaling: str, sigma_lo: float, sigma_hi: float) -> float:
    """Factor on the current latent ``x(sigma_lo)`` before the model sees it at ``sigma_hi`` (§3, §11).

    k-space, ``"reference"``: ``sqrt(1 + sigma_hi^2) / sqrt(1 + sigma_lo^2)`` (the reference feeds its DDPM
    latent unchanged at the next timestep); ``"k-space"``: 1. Flow latents are already in the model's own
    (bounded) scale, so the reference scheme feeds them unchanged: 1; ``"k-space"`` is refused on flow
    (it names the eps-model variant and has no flow meaning).
    """
    if family.flow:
        if scaling != "reference":
            raise EditLabError(
                f"input_scaling {scaling!r} is the eps-model (k-space) variant of DDIM inversion; a flow-matching "
                "model is inverted with 'reference' (the current latent at the next level, x' = x + (sigma' - sigma) v)")
        return 1.0
    if scaling == "reference":
        return math.sqrt(1.0 + sigma_hi ** 2) / math.sqrt(1.0 + sigma_lo ** 2)
    return 1.0


def loss_latent(family: ModelFamily, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Where papers measure latent losses: the DDPM latent ``x / sqrt(1 + sigma^2)`` (k-space), ``x`` (flow)."""
    return x if family.flow else x / math.sqrt(1.0 + float(sigma) ** 2)


def flow_sigma(t: float, shift: float = 1.0) -> float:
    """SD3's shifted flow level ``shift t / (1 + (shift - 1) t)`` for a time fraction t in [0, 1].

    ComfyUI's ``ModelSamplingDiscreteFlow.sigma``; the nodes read t0 through the model's own
    ``percent_to_sigma(1 - t0)`` (§1), which is this for SD3 and Flux-schnell (shift 1: sigma = t0).
    """
    t = float(t)
    return shift * t / (1.0 + (shift - 1.0) * t)


def family_named(name: str) -> ModelFamily:
    for fam in FAMILIES:
        if fam.name == name:
            return fam
    raise EditLabError(f"unknown model family {name!r}; one of {[f.name for f in FAMILIES]}")
