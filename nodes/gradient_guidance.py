"""Gradient Guider: classifier / CLIP guidance after CFG, for any sampler (docs/methods.md §10).

- ``EditLabGradientGuider``: MODEL + positive/negative + cfg + LOSS -> a GUIDER (ComfyUI's CFG, then
  ``D_hat = D + s * sigma^2 * grad_x log p`` on the steps of the window).
- ``EditLabGradientGuidance``: the same guidance on top of another GUIDER (Inversion Guider, Dual CFG Combiner,
  ...), e.g. to nudge only the target row of a real-photo edit.

Gradients run outside inference mode through zero-copy autograd views of the weights (``autograd_weights``,
the pattern of Null-Text Optimize), restored on exit; the input model is never patched. ``model`` mode
differentiates through the UNet (optionally with gradient checkpointing per block), ``x0`` mode only through the
VAE decoder and the loss (dD/dx taken as the identity).
"""
from __future__ import annotations

import contextlib
import copy

import torch
import torch.utils.checkpoint

import comfy.model_management
import comfy.samplers
from comfy_api.latest import io

from ..guidance.gradient import THROUGH, GradientGuidance, GuidanceWindow
from .common import EditLabError, EditLabNode, Progress, check_choice, model_family
from .gradients import autograd_weights
from .guidance_losses import GUIDANCE_CATEGORY, ClassifierGuidanceLossNode, ClipGuidanceLossNode, LossType


def _blocks(module: torch.nn.Module):
    """The highest sub-modules that have a forward of their own (UNet blocks, VAE decoder blocks)."""
    for child in module.children():
        if isinstance(child, (torch.nn.ModuleList, torch.nn.ModuleDict)) or type(child).forward is torch.nn.Module.forward:
            yield from _blocks(child)
        elif any(True for _ in child.parameters()):
            yield child


@contextlib.contextmanager
def checkpointed(module: torch.nn.Module):
    """Gradient checkpointing of each block of ``module`` for the duration of a block (activations recomputed in
    backward instead of stored); the blocks' own forwards are put back on exit, whatever happens."""
    patched = []
    try:
        for block in _blocks(module):
            original = block.forward

            def forward(*args, _original=original, **kwargs):
                if not torch.is_grad_enabled():
                    return _original(*args, **kwargs)
                return torch.utils.checkpoint.checkpoint(_original, *args, use_reentrant=False, **kwargs)
            block.forward = forward
            patched.append(block)
        yield
    finally:
        for block in patched:
            del block.forward  # the instance attribute; the class's forward shows through again


def decoder_of(vae_model: torch.nn.Module) -> torch.nn.Module:
    """The decoding half of a VAE module: ``decoder`` (ComfyUI's AutoencoderKL), ``taesd_decoder`` (TAESD),
    else the module itself."""
    for name in ("decoder", "taesd_decoder"):
        part = getattr(vae_model, name, None)
        if isinstance(part, torch.nn.Module):
            return part
    return vae_model


def pixel_decoder(model_patcher, vae):
    """Model-space latent -> [B, 3, H, W] in [0, 1], differentiable (SD-family VAEs decode to [-1, 1])."""
    base = model_patcher.model

    def decode(latent: torch.Tensor) -> torch.Tensor:
        z = base.process_latent_out(latent).to(vae.device, vae.vae_dtype)
        img = (vae.first_stage_model.decode(z).float() + 1.0) / 2.0
        # clamped values, unclamped gradient: CLIP still sees why a saturated pixel should move back
        return img + (img.clamp(0.0, 1.0) - img).detach()
    return decode


class GradientGuidanceMixin:
    """``predict_noise`` of the guider it is mixed into, then gradient guidance on the window's steps."""

    def set_gradient_guidance(self, guidance: GradientGuidance, vae, checkpointing: bool) -> None:
        self.gradient_guidance, self.guidance_vae, self.guidance_checkpointing = guidance, vae, checkpointing

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        base = super().predict_noise
        g: GradientGuidance = self.gradient_guidance
        sample_sigmas = model_options.get("transformer_options", {}).get("sample_sigmas")
        if not g.active(float(timestep.flatten()[0]), sample_sigmas):
            return base(x, timestep, model_options, seed)
        Progress.check_cancel()
        loss = g.loss
        decode = pixel_decoder(self.model_patcher, self.guidance_vae) if loss.space == "pixel" else None
        through_unet = g.through == "model" and loss.sees == "denoised"
        patchers = list(getattr(loss, "patchers", [])) + ([self.guidance_vae.patcher] if decode else [])
        if patchers:
            comfy.model_management.load_models_gpu(patchers)
        modules = list(getattr(loss, "modules", []))
        if decode:
            modules.append(self.guidance_vae.first_stage_model)
        if through_unet:
            modules.append(self.inner_model.diffusion_model)

        def predict(z: torch.Tensor) -> torch.Tensor:
            # a fresh sigma tensor: the sampler's was made in inference mode and cannot be saved for backward
            return base(z, timestep.clone(), model_options, seed)

        with contextlib.ExitStack() as stack:
            for m in modules:
                stack.enter_context(autograd_weights(m))
            if self.guidance_checkpointing:
                if decode:  # the decoder's blocks (the encoder is not run)
                    stack.enter_context(checkpointed(decoder_of(self.guidance_vae.first_stage_model)))
                if through_unet:
                    stack.enter_context(checkpointed(self.inner_model.diffusion_model))
            try:
                out = g.guide(predict, x, timestep, decode)  # the window was checked above
            except RuntimeError as exc:
                if "Inference tensors cannot be saved for backward" in str(exc):
                    raise EditLabError(
                        "gradient_through 'model' needs gradients through every network in the prediction; a "
                        "ControlNet or adapter on the conditioning cannot provide them. Use gradient_through 'x0', "
                        "or remove that network") from exc
                raise
        Progress.check_cancel()
        return out.to(x.dtype)


class GradientGuider(GradientGuidanceMixin, comfy.samplers.CFGGuider):
    """ComfyUI's CFG guider followed by gradient guidance."""


_WRAPPED: dict[type, type] = {}


def guided_copy(guider, guidance: GradientGuidance, vae, checkpointing: bool):
    """A shallow copy of ``guider`` whose class also applies gradient guidance; the input GUIDER is untouched."""
    cls = type(guider)
    if cls not in _WRAPPED:
        _WRAPPED[cls] = type(f"Gradient{cls.__name__}", (GradientGuidanceMixin, cls), {})
    out = copy.copy(guider)
    out.__class__ = _WRAPPED[cls]
    out.set_gradient_guidance(guidance, vae, checkpointing)
    return out


def parse_rows(rows: str) -> list[int] | None:
    text = rows.strip()
    if not text or text.lower() == "all":
        return None
    try:
        return [int(r) for r in text.replace(";", ",").split(",") if r.strip()]
    except ValueError:
        raise EditLabError(f"rows: {rows!r} is not a comma-separated list of row numbers (e.g. '1' or '1, 2'); "
                           "empty = every row") from None


def build_guidance(model, loss, scale, sigma_start, sigma_end, every_k, gradient_through, rows, vae, what: str):
    """Checks everything a guided run needs before any work, and the guidance object."""
    family = model_family(model)  # k-space or flow (docs/methods.md §11); refuses an unknown parametrisation
    check_choice(gradient_through, THROUGH, "gradient_through")
    latent_channels = int(model.model.latent_format.latent_channels)
    if getattr(loss, "space", None) == "pixel":
        if vae is None:
            raise EditLabError(f"{what}: the loss scores decoded images; connect the checkpoint's VAE to the vae input")
        if int(vae.latent_channels) != latent_channels:
            raise EditLabError(f"{what}: the VAE takes {vae.latent_channels}-channel latents but the model makes "
                               f"{latent_channels}-channel ones; connect the VAE that belongs to this checkpoint")
    channels = getattr(loss, "channels", None)
    if getattr(loss, "space", None) == "latent" and channels is not None and int(channels) != latent_channels:
        raise EditLabError(f"{what}: the classifier takes {channels}-channel latents but the model's latents have "
                           f"{latent_channels} channels; use a classifier trained on this model family's latents")
    return GradientGuidance(loss, float(scale), GuidanceWindow(float(sigma_start), float(sigma_end), int(every_k)),
                            gradient_through, parse_rows(rows), flow=family.flow)


def _guidance_inputs() -> list:
    return [
        LossType.Input("loss", tooltip="What to steer toward: CLIP Guidance Loss, Classifier Guidance Loss, or any "
                                       "node producing a LOSS (see the README for its shape)."),
        io.Float.Input("scale", default=100.0, min=0.0, max=1e6, step=1.0,
                       tooltip="s in D_hat = D + s * sigma^2 * grad log p (log p = -loss). 0 = off (exactly the "
                               "unguided result). Tune per loss: CLIP losses need tens to thousands."),
        io.Float.Input("sigma_start", default=0.0, min=0.0, max=1.0, step=0.01,
                       tooltip="First guided step as a fraction of the run (0 = the first, noisiest step)."),
        io.Float.Input("sigma_end", default=0.8, min=0.0, max=1.0, step=0.01,
                       tooltip="Last guided step as a fraction of the run (1 = the last step). Late steps change "
                               "little and cost as much."),
        io.Int.Input("every_k", default=1, min=1, max=1000,
                     tooltip="Guide every k-th step inside the window (the others are plain steps): k times cheaper."),
        io.Combo.Input("gradient_through", options=list(THROUGH), default="x0",
                       tooltip="x0: differentiate the loss only through the VAE and the loss (dD/dx taken as the "
                               "identity; cheap). model: also through the UNet (the exact gradient; one backward "
                               "pass per guided step)."),
        io.Boolean.Input("checkpointing", default=True,
                         tooltip="Gradient checkpointing of the UNet / VAE decoder blocks: less memory, some "
                                 "recomputation."),
        io.String.Input("rows", default="",
                        tooltip="Batch rows to guide, e.g. '1' for the target row of a [source, target] edit. "
                                "Empty = every row."),
        io.Vae.Input("vae", optional=True, tooltip="Decodes the prediction for losses on images (CLIP): the "
                                                   "checkpoint's VAE, or TAESD (Load VAE: taesd / taesdxl), "
                                                   "several times cheaper per guided step."),
    ]


class GradientGuiderNode(EditLabNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EditLabGradientGuider",
            display_name="Gradient Guider",
            category=GUIDANCE_CATEGORY,
            description="A GUIDER for SamplerCustomAdvanced (any sampler and scheduler): classifier-free guidance, "
                        "then gradient guidance D_hat = D + s * sigma^2 * grad log p on the steps of the window "
                        "(classifier guidance, Dhariwal & Nichol; CLIP guidance as in GLIDE, approximated with an "
                        "ordinary CLIP on the decoded x0 prediction; docs/methods.md §10). Works with LoRAs and "
                        "ControlNets (x0 mode). SD1.x / SD2.x / SDXL and flow models (SD3, Flux: the same step in "
                        "their k-space counterpart).",
            inputs=[
                io.Model.Input("model", tooltip="The model to sample (any eps / v-prediction checkpoint)."),
                io.Conditioning.Input("positive", tooltip="The prompt (CFG's conditional branch)."),
                io.Conditioning.Input("negative", tooltip="The negative prompt (CFG's unconditional branch)."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1,
                               tooltip="Classifier-free guidance scale. 1 = no CFG (GLIDE's CLIP-guidance-only setting)."),
                *_guidance_inputs(),
            ],
            outputs=[io.Guider.Output(tooltip="Use with SamplerCustomAdvanced and any sampler.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, cfg, loss, scale, sigma_start, sigma_end, every_k, gradient_through,
                checkpointing, rows, vae=None) -> io.NodeOutput:
        guidance = build_guidance(model, loss, scale, sigma_start, sigma_end, every_k, gradient_through, rows, vae,
                                  "Gradient Guider")
        guider = GradientGuider(model)
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        guider.set_gradient_guidance(guidance, vae, bool(checkpointing))
        return io.NodeOutput(guider)


class GradientGuidanceNode(EditLabNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EditLabGradientGuidance",
            display_name="Gradient Guidance (on a GUIDER)",
            category=GUIDANCE_CATEGORY,
            description="Adds gradient guidance (classifier / CLIP; docs/methods.md §10) on top of another GUIDER's "
                        "prediction: Inversion Guider, Dual CFG Combiner, CFGGuider... e.g. nudge only the target "
                        "row of a real-photo Prompt-to-Prompt edit toward a text or an image (rows = '1'). The input "
                        "GUIDER is not changed.",
            inputs=[io.Guider.Input("guider", tooltip="The GUIDER whose prediction is guided."), *_guidance_inputs()],
            outputs=[io.Guider.Output(tooltip="Use with SamplerCustomAdvanced, as the input guider.")],
        )

    @classmethod
    def execute(cls, guider, loss, scale, sigma_start, sigma_end, every_k, gradient_through, checkpointing, rows,
                vae=None) -> io.NodeOutput:
        if not isinstance(guider, comfy.samplers.CFGGuider):
            raise EditLabError(f"guider: expected a GUIDER built on ComfyUI's CFGGuider, got {type(guider).__name__}")
        guidance = build_guidance(guider.model_patcher, loss, scale, sigma_start, sigma_end, every_k, gradient_through,
                                  rows, vae, "Gradient Guidance")
        return io.NodeOutput(guided_copy(guider, guidance, vae, bool(checkpointing)))


NODES = [GradientGuiderNode, GradientGuidanceNode, ClipGuidanceLossNode, ClassifierGuidanceLossNode]
