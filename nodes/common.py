"""Shared helpers for EditLab nodes: the only layer that talks to ComfyUI.

One way to do a thing: LATENT <-> model-space tensors, t0 <-> sigma, MASK -> latent mask,
progress + cancel for long loops, and the error type users see.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
from comfy_api.latest import io

from ..errors import EditLabError
from ..samplers import family as fam
from ..samplers.sdedit import check_t0, tail_schedule

CATEGORY = "EditLab"


class EditLabNode(io.ComfyNode):
    """Base of every EditLab node: checks each declared choice and bound at queue time.

    ComfyUI 0.3.64 does not check a schema-style node's combo values (an API prompt or a hand-edited
    workflow with an unknown value would reach ``execute``), and a node that defines ``validate_inputs``
    with ``**kwargs`` turns off ComfyUI's own min/max checks; so this validator checks both, for every
    widget value the prompt holds (linked inputs arrive as None and are checked where they are used).
    """

    @classmethod
    def validate_inputs(cls, **kwargs) -> bool | str:
        problems = [p for p in (_check_widget(i, kwargs.get(i.id)) for i in _widget_inputs(cls)) if p]
        return "; ".join(problems) if problems else True


def _widget_inputs(node: type[io.ComfyNode]) -> list:
    # define_schema, not GET_SCHEMA: validation runs on a locked copy of the class.
    return [i for i in node.define_schema().inputs if isinstance(i, io.WidgetInput)]


def _check_widget(spec, value) -> str | None:
    if value is None:
        return None
    if isinstance(spec, io.Combo.Input):
        options = list(spec.options or [])
        if options and value not in options:
            return f"{spec.id}: {value!r} is not one of {options}"
        return None
    bounded = isinstance(spec, (io.Int.Input, io.Float.Input)) and isinstance(value, (int, float))
    if bounded and spec.min is not None and value < spec.min:
        return f"{spec.id}: {value} is below the minimum {spec.min}"
    if bounded and spec.max is not None and value > spec.max:
        return f"{spec.id}: {value} is above the maximum {spec.max}"
    return None


def check_choice(value: str, options, what: str) -> str:
    """A choice checked where it is used (also when it arrives through a link)."""
    if value not in options:
        raise EditLabError(f"{what}: {value!r} is not one of {list(options)}")
    return value


def latent_samples(latent: dict, what: str = "latent") -> torch.Tensor:
    """The ``samples`` tensor of a LATENT dict, checked for shape and finiteness."""
    if not isinstance(latent, dict) or "samples" not in latent:
        raise EditLabError(f"{what}: expected a LATENT (a dict with 'samples'), got {type(latent).__name__}")
    samples = latent["samples"]
    if samples.ndim != 4:
        raise EditLabError(f"{what}: expected an image latent [batch, channels, h, w], got shape {tuple(samples.shape)}")
    if not torch.isfinite(samples).all():
        raise EditLabError(f"{what}: the latent contains NaN or inf values; re-encode the image with the VAE")
    return samples


def model_sampling(model):
    return model.get_model_object("model_sampling")


def is_k_space(ms) -> bool:
    """True when the model noises as ``x = x0 + sigma * eps`` (EPS / V-prediction: SD1.x, SD2.x, SDXL)."""
    one = torch.ones(1, 1, 1, 1)
    zero = torch.zeros(1, 1, 1, 1)
    probe = ms.noise_scaling(torch.tensor([0.5]), zero.clone(), one.clone(), max_denoise=False)
    return bool(torch.allclose(probe, one))


def family_of(base_model, ms) -> fam.ModelFamily:
    """The model family (docs/methods.md §11) from ComfyUI's own objects: the model sampling in force and the base model.

    - ``CONST`` model sampling (``x = (1 - sigma) x0 + sigma z``: SD3.x, Flux, AuraFlow, a ModelSamplingSD3 /
      ModelSamplingFlux patch) is flow; it is *guidance-distilled* when the network takes the CFG scale as an
      input (``unet_config["guidance_embed"]``: Flux-dev and its fine-tunes), so it has no unconditional branch;
    - a model whose ``noise_scaling`` is ``x0 + sigma z`` (EPS / V-prediction / EDM) is k-space;
    - anything else (X0, IMG_TO_IMG, Cosmos' RFLOW) is refused: no method here knows its parametrisation.

    The class test is confirmed by probing the model's own ``noise_scaling`` against the family's formula,
    so the pure samplers (which use ``samplers/family.py``) and the model can never disagree silently.
    """
    import comfy.model_sampling

    if isinstance(ms, comfy.model_sampling.CONST) and _noise_scaling_matches(ms, fam.FLOW):
        config = getattr(getattr(base_model, "model_config", None), "unet_config", None) or {}
        return fam.FLOW_DISTILLED if config.get("guidance_embed") else fam.FLOW
    if is_k_space(ms) and _noise_scaling_matches(ms, fam.K_SPACE):
        return fam.K_SPACE
    raise EditLabError(
        f"the model ({model_type_name(base_model, ms)}) uses a noise parametrisation EditLab does not know "
        "(neither x0 + sigma * noise nor (1 - sigma) * x0 + sigma * noise); use an SD1.x/SD2.x/SDXL, SD3.x or Flux model")


def model_family(model) -> fam.ModelFamily:
    """:func:`family_of` for a MODEL (ModelPatcher), with its object patches (ModelSamplingSD3 ...) in force."""
    return family_of(model.model, model_sampling(model))


def model_type_name(base_model, ms) -> str:
    """``"Flux, model sampling ModelSamplingFlux/CONST"``: how a message names a model."""
    kinds = "/".join(c.__name__ for c in type(ms).__mro__[1:] if c.__module__.startswith("comfy."))
    return f"{type(base_model).__name__}, model sampling {kinds or type(ms).__name__}"


def _noise_scaling_matches(ms, family: fam.ModelFamily) -> bool:
    sigma = torch.tensor([0.25])
    x0 = torch.full((1, 1, 1, 1), 2.0)
    z = torch.full((1, 1, 1, 1), -1.0)
    own = ms.noise_scaling(sigma, z.clone(), x0.clone(), max_denoise=False)
    return bool(torch.allclose(own, fam.noise(family, x0, z, 0.25)))


def noise_latent(ms, x0: torch.Tensor, z: torch.Tensor, sigma: float) -> torch.Tensor:
    """``x0`` noised to ``sigma`` by the model's own ``noise_scaling`` (``x0 + sigma z`` or ``(1 - sigma) x0 + sigma z``)."""
    level = torch.tensor([float(sigma)], dtype=x0.dtype)
    return ms.noise_scaling(level, z.to(x0), x0.clone(), max_denoise=False)


def refuse_no_uncond(what: str, base_model, ms, why: str) -> None:
    """Refuse a method that needs an unconditional branch on a guidance-distilled model (docs/methods.md §11)."""
    if family_of(base_model, ms).has_uncond:
        return
    raise EditLabError(
        f"{what}: the model ({model_type_name(base_model, ms)}) is guidance-distilled (Flux-dev style: the CFG scale "
        f"is an input of the network, set by FluxGuidance), so it has no unconditional branch and {why}. "
        "Use a model with real classifier-free guidance (SD1.x, SDXL, SD3.x, Flux-schnell, a de-distilled Flux) "
        "or a method that needs none (the Inversion Guider's direct or plain mode).")


def refuse_flow(model, what: str, instead: str = "") -> None:
    """Refuse a flow-matching MODEL (SD3 / Flux rectified flow, docs/methods.md §11), from its family.

    For the one node whose maths is still k-space only (DreamBooth's prior-preservation target); every
    other node asks :func:`model_family` and follows the family. The model's object patches (ModelSamplingSD3
    ...) are in force; an unknown parametrisation is refused by :func:`model_family` itself. Called before any work.
    """
    if not model_family(model).flow:
        return
    raise EditLabError(
        f"{what}: the model ({model_type_name(model.model, model_sampling(model))}) is a "
        "flow-matching model (rectified flow: SD3, Flux), which is not supported yet; this needs an eps / "
        "v-prediction model that noises as x0 + sigma * noise (SD1.x, SD2.x, SDXL, without a ModelSamplingSD3 / "
        f"ModelSamplingFlux patch). {instead}".rstrip())


def t0_to_sigma(ms, t0: float) -> float:
    """SDEdit's t0 on the model's own schedule.

    t0 is a fraction of the model's training timesteps, counted from clean (0) to pure noise (1):
    ``sigma(t0) = model_sampling.percent_to_sigma(1 - t0)``; for SD1.x that is
    ``sigma(timestep = t0 * 999)``, so t0 = 0.5 is the reference code's t = 500. t0 = 1 is sigma_max.
    The same call serves flow models (SD3: ``shift t0 / (1 + (shift - 1) t0)``, ``family.flow_sigma``).
    """
    t0 = check_t0(t0)
    if t0 >= 1.0:
        return float(ms.sigma_max)
    return float(ms.percent_to_sigma(1.0 - t0))


def sdedit_sigmas(model, t0: float, steps: int, scheduler: str) -> torch.Tensor:
    """The SIGMAS tail from sigma(t0) to 0 with ``steps`` steps of ``scheduler``."""
    if steps < 1:
        raise EditLabError(f"steps must be at least 1, got {steps}")
    check_choice(scheduler, comfy.samplers.SCHEDULER_NAMES, "scheduler")
    ms = model_sampling(model)
    # A pre-noised flow latent cannot start at sigma 1 (the sampler multiplies it by 1 - sigma): cap it.
    sigma0 = fam.cap_start(model_family(model), t0_to_sigma(ms, t0))
    total = max(steps, int(math.ceil(steps / check_t0(t0))))
    full = comfy.samplers.calculate_sigmas(ms, scheduler, total).cpu()
    return tail_schedule(full, sigma0, steps)


def noise_for(latent: dict, seed: int) -> torch.Tensor:
    """The same draw ComfyUI's RandomNoise node makes for this latent and seed."""
    return comfy.sample.prepare_noise(latent["samples"], seed, latent.get("batch_index"))


def to_model_space(model, samples: torch.Tensor) -> torch.Tensor:
    return model.get_model_object("process_latent_in")(samples)


def to_latent_space(model, samples: torch.Tensor) -> torch.Tensor:
    return model.get_model_object("process_latent_out")(samples)


def latent_mask(mask: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
    """A ComfyUI MASK ([B,H,W] or [H,W], image or latent resolution) as a [B,1,h,w] latent mask.

    Only image-size or latent-size masks are accepted: a mask of another size is a mistake (it would be
    silently stretched), so the error says how to fix it.
    """
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    if mask.ndim != 3:
        raise EditLabError(f"mask: expected [batch, height, width], got shape {tuple(mask.shape)}")
    b, _, h, w = samples.shape
    mh, mw = mask.shape[-2:]
    ok_sizes = {(h, w)} | {(h * f, w * f) for f in (8, 16)}
    if (mh, mw) not in ok_sizes:
        raise EditLabError(
            f"mask is {mw}x{mh} px but the latent is {w}x{h} (an image of {w * 8}x{h * 8} px); "
            "load the mask at the image's size (or scale it with an upscale/resize node)"
        )
    if mask.shape[0] not in (1, b):
        raise EditLabError(f"mask batch {mask.shape[0]} does not match the latent batch {b} (use 1 mask or one per image)")
    if not torch.isfinite(mask).all():
        raise EditLabError("mask contains NaN or inf values")
    m = comfy.utils.reshape_mask(mask.float(), samples.shape)[:, :1]
    if m.shape[0] != b:
        m = m.expand(b, -1, -1, -1)
    return m.clamp(0.0, 1.0)


class Progress:
    """A ComfyUI progress bar that also makes long loops cancellable."""

    def __init__(self, total: int):
        self.bar = comfy.utils.ProgressBar(total)

    @staticmethod
    def check_cancel() -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()

    def step(self, n: int = 1) -> None:
        self.check_cancel()
        self.bar.update(n)


def cancel_callback() -> Callable[..., None]:
    """A sampler callback that only checks for the user's cancel."""

    def callback(*_args, **_kwargs) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()

    return callback
