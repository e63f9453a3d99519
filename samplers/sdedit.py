"""SDEdit (Meng et al., ICLR 2022) and GLIDE-style known-region replacement, in k-diffusion form.

Notation follows docs/methods.md §1: the sampler works in ComfyUI's "k-space", ``x = x0 + sigma * eps``
(the VE-SDE of the paper), and ``model(x, sigma)`` returns the denoised prediction ``D(x, sigma)``. On a
flow-matching model (``family=FLOW``, docs/methods.md §11) the marginal is ``(1 - sigma) x0 + sigma z``:
perturbation and known-region re-noising use it, and the reverse sampler takes the marginal-keeping
posterior step of ``samplers/family.py`` (the Euler–Maruyama step is singular at the flow level sigma = 1).

Nothing here imports ComfyUI: ``sample_reverse_sde`` has the k-diffusion signature
``fn(model, x, sigmas, extra_args, callback, disable, **knobs)`` so ComfyUI's ``KSAMPLER`` (or any
k-diffusion host) can call it unchanged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch
from tqdm.auto import tqdm

from ..errors import EditLabError
from . import family as fam
from .family import K_SPACE, ModelFamily

Denoiser = Callable[..., torch.Tensor]
NoiseSource = Callable[[torch.Tensor], torch.Tensor]

KnownNoise = Literal["same", "fresh"]
ReplaceOn = Literal["x_t", "x0", "both"]
ReverseMode = Literal["stochastic", "deterministic"]
KNOWN_NOISE: tuple[str, ...] = ("same", "fresh")
REPLACE_ON: tuple[str, ...] = ("x_t", "x0", "both")
REVERSE_MODES: tuple[str, ...] = ("stochastic", "deterministic")


def check_option(value: object, options: tuple[str, ...], what: str) -> str:
    """A mode string must be one of ``options``: an unknown one is refused, never read as a default."""
    if value not in options:
        raise EditLabError(f"{what} must be one of {list(options)}, got {value!r}")
    return value  # type: ignore[return-value]


def check_t0(t0: float) -> float:
    """Validate the SDEdit start time ``t0`` (a fraction of the model's timesteps)."""
    if not isinstance(t0, (int, float)) or math.isnan(float(t0)):
        raise EditLabError(f"t0 must be a number in (0, 1], got {t0!r}")
    t0 = float(t0)
    if not 0.0 < t0 <= 1.0:
        raise EditLabError(
            f"t0 must be in (0, 1] (a fraction of the model's noise schedule), got {t0}; "
            "0.3-0.6 is the paper's range for stroke guides, 1.0 is pure generation"
        )
    return t0


def check_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """A schedule must hold at least one step and be non-increasing and finite."""
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise EditLabError(
            f"the sigma schedule is empty (got {sigmas.numel()} value(s)); it needs at least two "
            "(a start and an end level) - raise steps or t0"
        )
    if not torch.isfinite(sigmas).all():
        raise EditLabError("the sigma schedule contains NaN or inf values")
    if (sigmas[1:] > sigmas[:-1]).any():
        raise EditLabError("the sigma schedule must be non-increasing (noisiest level first)")
    return sigmas


def tail_schedule(full: torch.Tensor, sigma0: float, steps: int) -> torch.Tensor:
    """The last ``steps`` steps of a full schedule, re-anchored to start exactly at ``sigma0``.

    ``full`` is a schedule computed for ``ceil(steps / t0)`` steps, so its last ``steps + 1`` values
    start within one step of ``sigma(t0)``; the first value is replaced by ``sigma0`` so that the
    perturbation level is exactly the documented one, and any later value that would not be below it
    is dropped (keeps the schedule strictly decreasing at its start).
    """
    if steps < 1:
        raise EditLabError(f"steps must be at least 1, got {steps}")
    tail = full[-(steps + 1):].clone().float()
    rest = tail[1:]
    rest = rest[rest < sigma0]
    return torch.cat([tail.new_tensor([sigma0]), rest])


def perturb(x0: torch.Tensor, sigma0: float, noise: torch.Tensor, family: ModelFamily = K_SPACE) -> torch.Tensor:
    """SDEdit perturbation ``x(t0) = x0 + sigma(t0) * z`` (the VE-SDE marginal, docs/methods.md §1);
    ``(1 - sigma0) x0 + sigma0 z`` on a flow model (§11)."""
    return fam.noise(family, x0, noise, sigma0)


@dataclass
class KnownRegion:
    """What to keep while sampling (stroke editing / inpainting).

    ``mask`` uses ComfyUI's convention: 1 = regenerate, 0 = keep the guide. ``guide`` is the clean
    latent in model space. ``noise`` is the fixed draw used to re-noise the known region
    (``known_noise="same"``, SDEdit); ``None`` with ``"fresh"`` draws new noise every step
    (GLIDE / RePaint). ``replace_on`` chooses where the known region is written back: on the running
    sample ``x_t`` (SDEdit, diffusers), on the ``x0`` prediction (GLIDE), or both.
    """

    guide: torch.Tensor
    mask: torch.Tensor
    noise: Optional[torch.Tensor] = None
    known_noise: KnownNoise = "same"
    replace_on: ReplaceOn = "x_t"
    family: ModelFamily = K_SPACE

    def __post_init__(self) -> None:
        check_option(self.known_noise, KNOWN_NOISE, "known_noise")
        check_option(self.replace_on, REPLACE_ON, "replace_on")
        if self.known_noise == "same" and self.noise is None:
            raise EditLabError("known_noise='same' needs the fixed noise draw")

    def check(self, x: torch.Tensor) -> None:
        if self.guide.shape != x.shape:
            raise EditLabError(
                f"guide latent shape {tuple(self.guide.shape)} does not match the sampled latent {tuple(x.shape)}"
            )
        if self.mask.ndim != x.ndim or any(m not in (1, s) for m, s in zip(self.mask.shape, x.shape)):
            raise EditLabError(
                f"mask shape {tuple(self.mask.shape)} cannot be broadcast to the latent {tuple(x.shape)}; "
                "resize the mask to the image size"
            )

    def renoise(self, sigma: torch.Tensor, draw: NoiseSource, x: torch.Tensor) -> torch.Tensor:
        """The known region at level ``sigma`` in the family's marginal (same or fresh ``z``):
        ``guide + sigma z`` (k-space, docs/methods.md §1) or ``(1 - sigma) guide + sigma z`` (flow, §11).
        """
        z = self.noise if self.known_noise == "same" else draw(x)
        return fam.noise(self.family, self.guide, z, sigma)

    def paste(self, x: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
        """``m * x + (1 - m) * known`` (docs/methods.md §1, stroke editing)."""
        return self.mask * x + (1.0 - self.mask) * known

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """The final sample at sigma = 0: the known region is the guide itself, exactly."""
        return self.paste(x, self.guide)


def seeded_noise(seed: Optional[int]) -> NoiseSource:
    """A noise source that is reproducible for a given seed (drawn on the CPU, then moved)."""
    generator = torch.Generator(device="cpu")
    if seed is not None:
        generator.manual_seed(int(seed))
    else:
        generator.seed()

    def draw(like: torch.Tensor) -> torch.Tensor:
        return torch.randn(like.shape, generator=generator, dtype=torch.float32).to(like.device, like.dtype)

    return draw


def reverse_sde_step(
    x: torch.Tensor,
    denoised: torch.Tensor,
    sigma: float,
    sigma_next: float,
    z: Optional[torch.Tensor],
) -> torch.Tensor:
    """One reverse VE-SDE Euler–Maruyama step (docs/methods.md §1).

    1. score = (D - x) / sigma^2
    2. x' = x + (sigma^2 - sigma'^2) * score + sqrt(sigma^2 - sigma'^2) * z
    With ``z=None`` this is the probability-flow variant: no noise, half the drift.
    The last step to sigma' = 0 is x' = D. Sigmas are Python floats: no device sync per step.
    """
    if sigma_next == 0.0:
        return denoised
    var = sigma**2 - sigma_next**2
    score = (denoised - x) / sigma**2
    if z is None:
        return x + 0.5 * var * score
    return x + var * score + math.sqrt(var) * z


@torch.no_grad()
def sample_reverse_sde(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: Optional[dict] = None,
    callback: Optional[Callable[[dict], None]] = None,
    disable: Optional[bool] = None,
    *,
    mode: ReverseMode = "stochastic",
    noise_source: Optional[NoiseSource] = None,
    repeat: int = 1,
    family: ModelFamily = K_SPACE,
) -> torch.Tensor:
    """SDEdit reverse sampler: VE-SDE Euler–Maruyama (Meng et al. 2022, Alg. 1), k-diffusion signature.

    On a flow model (``family.flow``) the stochastic step is :func:`family.posterior_step` (keeps the
    marginal ``(1 - sigma) x0 + sigma z`` exactly for a point mass; defined at sigma = 1) and the
    deterministic one is the Euler step of the flow ODE ``x' = x + (sigma' - sigma) v`` (docs/methods.md §11).

    ``mode="deterministic"`` drops the noise and halves the drift (probability flow, docs/methods.md §1).
    ``repeat`` runs the perturb-and-reverse loop K times, each round re-perturbing the previous output
    to ``sigmas[0]`` with fresh noise (the reference code's K). Known regions (stroke editing,
    inpainting) compose from outside through :func:`with_known_region`, for this or any sampler.

    Progress is one bar over all rounds (``repeat * steps``, hidden when ``disable`` is true, as in
    k-diffusion), and the callback's ``i`` counts on across rounds, so previews never run backwards.
    """
    extra_args = {} if extra_args is None else extra_args
    check_sigmas(sigmas)
    deterministic = check_option(mode, REVERSE_MODES, "mode") == "deterministic"
    if repeat < 1:
        raise EditLabError(f"repeat must be at least 1, got {repeat}")
    draw = noise_source if noise_source is not None else seeded_noise(extra_args.get("seed"))
    s_in = x.new_ones([x.shape[0]])
    levels = sigmas.tolist()  # one host read for the whole run, not one per step
    n = len(levels) - 1
    with tqdm(total=repeat * n, disable=disable) as bar:
        for rnd in range(repeat):
            if rnd > 0:
                # Re-perturb the previous round's output (x at sigma ~ 0) back to sigma(t0).
                x = fam.noise(family, x, draw(x), levels[0])
            for i in range(n):
                sigma, sigma_next = levels[i], levels[i + 1]
                denoised = model(x, sigmas[i] * s_in, **extra_args)
                if callback is not None:
                    callback({"x": x, "i": rnd * n + i, "sigma": sigmas[i], "sigma_hat": sigmas[i],
                              "denoised": denoised})
                z = None if deterministic or sigma_next == 0.0 else draw(x)
                if family.flow:
                    x = fam.posterior_step(family, x, denoised, sigma, sigma_next, z)
                else:
                    x = reverse_sde_step(x, denoised, sigma, sigma_next, z)
                bar.update(1)
    return x


def with_known_region(model: Denoiser, known: KnownRegion, draw: NoiseSource) -> Denoiser:
    """Wrap a denoiser so that any sampler keeps ``known``'s region of the guide (docs/methods.md §1-2).

    Before each evaluation the known region of ``x`` is replaced by the guide noised to the current
    level (same or fresh draw); after it, the x0 prediction's known region is replaced by the guide
    (GLIDE). Replacing ``x`` before the evaluation at ``sigma_{i+1}`` is the same as SDEdit's
    replacement after the step to ``sigma_{i+1}``. Finish with :meth:`KnownRegion.finish`.
    """

    def denoise(x: torch.Tensor, sigma: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if known.replace_on in ("x_t", "both"):
            level = sigma.reshape([-1] + [1] * (x.ndim - 1)).to(x.dtype)
            x = known.paste(x, known.renoise(level, draw, x))
        denoised = model(x, sigma, *args, **kwargs)
        if known.replace_on in ("x0", "both"):
            denoised = known.paste(denoised, known.guide)
        return denoised

    return denoise


def latent_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row mean squared error (the t0 search's faithfulness distance)."""
    if a.shape != b.shape:
        raise EditLabError(f"cannot compare shapes {tuple(a.shape)} and {tuple(b.shape)}")
    return ((a.float() - b.float()) ** 2).flatten(1).mean(dim=1)


@dataclass
class T0SearchResult:
    t0: float
    distance: float
    result: object
    trials: list[tuple[float, float]]


def search_t0(
    run: Callable[[float], tuple[object, float]],
    budget: float,
    *,
    lo: float = 0.05,
    hi: float = 1.0,
    max_runs: int = 8,
    on_trial: Optional[Callable[[int, float, float], None]] = None,
) -> T0SearchResult:
    """Largest t0 in [lo, hi] whose output stays within ``budget`` (SDEdit §4.2's realism/faithfulness knob).

    ``run(t0) -> (result, distance)`` samples once with a fixed seed. Faithfulness is taken to be
    monotone in t0 (larger t0, larger distance), so a bisection over at most ``max_runs`` sampler runs
    finds the answer: ``hi`` is tried first (if it is within budget nothing larger exists), then ``lo``
    (if even that exceeds the budget the least-noisy result is returned and flagged by its distance),
    then the interval is halved. The best feasible result seen is returned.
    """
    if not budget > 0 or math.isinf(budget):
        raise EditLabError(f"the faithfulness budget must be a positive finite number, got {budget}")
    if not 0.0 < lo < hi <= 1.0:
        raise EditLabError(f"need 0 < lo < hi <= 1 for the t0 search, got lo={lo}, hi={hi}")
    if max_runs < 2:
        raise EditLabError(f"the t0 search needs at least 2 sampler runs, got {max_runs}")
    trials: list[tuple[float, float]] = []

    def trial(t0: float) -> tuple[object, float]:
        result, dist = run(t0)
        trials.append((t0, float(dist)))
        if on_trial is not None:
            on_trial(len(trials), t0, float(dist))
        return result, float(dist)

    res_hi, d_hi = trial(hi)
    if d_hi <= budget:
        return T0SearchResult(hi, d_hi, res_hi, trials)
    res_lo, d_lo = trial(lo)
    if d_lo > budget:
        return T0SearchResult(lo, d_lo, res_lo, trials)
    best = T0SearchResult(lo, d_lo, res_lo, trials)
    a, b = lo, hi
    while len(trials) < max_runs:
        mid = 0.5 * (a + b)
        res, d = trial(mid)
        if d <= budget:
            a = mid
            best = T0SearchResult(mid, d, res, trials)
        else:
            b = mid
    return best
