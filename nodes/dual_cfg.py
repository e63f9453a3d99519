"""InstructPix2Pix encoding and the Dual CFG Combiner (docs/methods.md §6).

- ``EditLabInstructPix2PixEncode``: CLIP + VAE + IMAGE + instruction -> the three condition levels
  (both = image + instruction, image only = image + negative text, neither = zero image + negative text)
  and an empty LATENT of the right size, with the image latent encoded as the reference does (VAE
  posterior mode, unscaled).
- ``EditLabDualCFGCombiner``: a GUIDER computing ``neither + s_I (base_only - neither) + s_T (both -
  base_only)`` from the three predictions of one batched forward pass, with per-step schedules for both
  scales and optional guidance rescale. Works with any sampler and any pair of conditions.
"""
from __future__ import annotations

import math

import torch

import comfy.model_base
import comfy.samplers
import comfy.utils
import node_helpers
from comfy_api.latest import io

from ..guidance.dual_cfg import SHAPES, DualCFG, ScaleSchedule, step_fraction
from .common import CATEGORY, EditLabError, EditLabNode, check_choice, is_k_space, model_sampling, refuse_no_uncond

DUAL_CFG_CATEGORY = f"{CATEGORY}/Dual CFG"
IMAGE_KEY = "concat_latent_image"
IP2P_MODEL_TYPES = "SD15_instructpix2pix or SDXL_instructpix2pix"
SIZE_FITS = ("crop", "resize")


# -- InstructPix2Pix Encode ---------------------------------------------------------------------

def fit_to_multiple(pixels: torch.Tensor, factor: int, fit: str) -> torch.Tensor:
    """An IMAGE ([B, H, W, C]) whose sides are multiples of ``factor``.

    ``crop``: centre crop to the largest multiple (at most factor - 1 px per side; no resampling, the
    convention of ComfyUI's VAEEncode and InstructPixToPixConditioning). ``resize``: scale the whole image
    to the largest multiple (Lanczos), as diffusers' image processor does: nothing is cut off, the aspect
    changes by less than one factor.
    """
    check_choice(fit, SIZE_FITS, "size_fit")  # checked first: an exact-size image must not hide a bad value
    h, w = int(pixels.shape[1]), int(pixels.shape[2])
    if h < factor or w < factor:
        raise EditLabError(f"the image is {w}x{h} px; the model needs at least {factor} px per side "
                           f"(its sides are used in multiples of {factor})")
    th, tw = (h // factor) * factor, (w // factor) * factor
    if (th, tw) == (h, w):
        return pixels
    if fit == "crop":
        top, left = (h - th) // 2, (w - tw) // 2
        return pixels[:, top:top + th, left:left + tw, :]
    return comfy.utils.common_upscale(pixels.movedim(-1, 1), tw, th, "lanczos", "disabled").movedim(1, -1)


def encode_text(clip, text: str) -> list:
    if clip is None:
        raise EditLabError("clip input is empty: connect the CLIP output of your checkpoint loader")
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


class InstructPix2PixEncode(EditLabNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EditLabInstructPix2PixEncode",
            display_name="InstructPix2Pix Encode",
            category=DUAL_CFG_CATEGORY,
            description="InstructPix2Pix (Brooks et al., CVPR 2023): encodes the photo and the edit instruction "
                        "into the three condition levels dual guidance needs - both (image + instruction), "
                        "image only (image + negative text), neither (no image = zeros, negative text) - plus "
                        "an empty latent of the right size. Connect the three to the Dual CFG Combiner in the "
                        "same order. The image latent is the VAE posterior mode, unscaled, as in the reference.",
            inputs=[
                io.Clip.Input("clip", tooltip="The text encoder of your InstructPix2Pix checkpoint."),
                io.Vae.Input("vae", tooltip="The VAE of your InstructPix2Pix checkpoint (encodes the photo)."),
                io.Image.Input("image", tooltip="The photo to edit. Sides are used in multiples of the VAE's "
                                                "factor (8 px); see size_fit."),
                io.String.Input("instruction", multiline=True, default="turn it into a watercolor painting",
                                tooltip="The edit, phrased as an instruction ('make it winter', 'turn the cat "
                                        "into a tiger'), not as a description of the result."),
                io.String.Input("negative", multiline=True, default="",
                                tooltip="Text of the 'no text' levels (image only, neither). Empty = the "
                                        "paper's unconditional prompt; a negative prompt works too."),
                io.Combo.Input("size_fit", options=list(SIZE_FITS), default="crop",
                               tooltip="When a side is not a multiple of 8 px: crop = centre-crop the few "
                                       "extra pixels (ComfyUI's convention, no resampling); resize = scale "
                                       "the whole image down to the multiple (diffusers' convention)."),
            ],
            outputs=[
                io.Conditioning.Output(display_name="both", tooltip="Image + instruction: e(c_I, c_T)."),
                io.Conditioning.Output(display_name="image_only", tooltip="Image + negative text: e(c_I, ∅)."),
                io.Conditioning.Output(display_name="neither", tooltip="No image (zeros) + negative text: e(∅, ∅)."),
                io.Latent.Output(display_name="latent", tooltip="An empty latent of the (fitted) image's size to "
                                                                "sample from with full denoise."),
            ],
        )

    @classmethod
    def execute(cls, clip, vae, image, instruction, negative, size_fit) -> io.NodeOutput:
        if vae is None:
            raise EditLabError("vae input is empty: connect the VAE output of your checkpoint loader")
        factor = int(vae.spacial_compression_encode())
        pixels = fit_to_multiple(image, factor, size_fit)
        # ComfyUI's VAE.encode returns the posterior mode (DiagonalGaussianRegularizer, sample=False), unscaled.
        image_latent = vae.encode(pixels[:, :, :, :3])
        text = encode_text(clip, instruction)
        no_text = encode_text(clip, negative)
        both = node_helpers.conditioning_set_values(text, {IMAGE_KEY: image_latent})
        image_only = node_helpers.conditioning_set_values(no_text, {IMAGE_KEY: image_latent})
        neither = node_helpers.conditioning_set_values(no_text, {IMAGE_KEY: torch.zeros_like(image_latent)})
        return io.NodeOutput(both, image_only, neither, {"samples": torch.zeros_like(image_latent)})


# -- Dual CFG Combiner --------------------------------------------------------------------------

class DualCFGCombinerGuider(comfy.samplers.CFGGuider):
    """Dual classifier-free guidance with scheduled scales and rescale, one batched forward per step.

    The conditions are stored as ``positive`` (both), ``negative`` (neither) and ``base_only``, and are
    passed to ``calc_cond_batch`` in that order, so attention patches see ``cond_or_uncond`` 0 for the
    fully conditioned rows and 1 for the unconditioned rows, as with ordinary CFG (2 = base only).

    Model patches are honoured as ComfyUI's own ``sampling_function`` / ``cfg_function`` do: pre-CFG
    functions (APG, TCFG, FreSca, ...) get the three predictions in that order (``conds_out`` = [both,
    neither, base_only], ``cond_scale`` = s_T, as ComfyUI's PerpNeg guider passes its three) before they
    are combined; post-CFG functions get the combined result. A two-way CFG replacement cannot combine
    three predictions and is refused by the node.
    """

    def __init__(self, model_patcher, combiner: DualCFG):
        super().__init__(model_patcher)
        self.combiner = combiner

    def set_conds(self, both, base_only, neither) -> None:
        self.inner_set_conds({"positive": both, "negative": neither, "base_only": base_only})

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        sample_sigmas = model_options.get("transformer_options", {}).get("sample_sigmas")
        fraction = step_fraction(float(timestep.flatten()[0]), sample_sigmas)
        need_base, need_neither = self.combiner.needs(fraction)
        pre_cfg = model_options.get("sampler_pre_cfg_function", [])
        # A pre-CFG function may change any prediction, so the scale-1 cancellations no longer hold.
        if model_options.get("disable_cfg1_optimization", False) or pre_cfg:
            need_base = need_neither = True
        extra_scale, _ = self.combiner.scales_at(fraction)
        both_c = self.conds.get("positive")
        neither_c = self.conds.get("negative") if need_neither else None
        base_c = self.conds.get("base_only") if need_base else None
        conds = [both_c, neither_c, base_c]
        # One call: ComfyUI batches all three into one forward pass when memory allows, else splits.
        out = comfy.samplers.calc_cond_batch(self.inner_model, conds, x, timestep, model_options)
        for fn in pre_cfg:
            out = fn({"conds": conds, "conds_out": out, "cond_scale": extra_scale, "timestep": timestep,
                      "input": x, "sigma": timestep, "model": self.inner_model, "model_options": model_options})
        both, neither, base_only = out[:3]
        if base_c is None:
            base_only = both  # extra_scale = base_scale = 1: the terms cancel exactly
        if neither_c is None:
            neither = base_only  # base_scale = 1: the term cancels exactly
        out = self.combiner.combine(x, timestep, both, base_only, neither, fraction)
        for fn in model_options.get("sampler_post_cfg_function", []):
            out = fn({"denoised": out, "cond": both_c, "uncond": self.conds.get("negative"),
                      "cond_scale": extra_scale, "model": self.inner_model, "uncond_denoised": neither,
                      "cond_denoised": both, "sigma": timestep, "model_options": model_options, "input": x})
        return out


def carries_image(conditioning) -> bool:
    return any(IMAGE_KEY in entry[1] for entry in conditioning or [])


def is_ip2p(model) -> bool:
    return isinstance(model.model, comfy.model_base.IP2P)


def check_pairing(model, both, base_only, neither) -> None:
    """Refuse, before sampling, the two wirings that make InstructPix2Pix 'do nothing' or fail."""
    with_image = [name for name, c in (("both", both), ("base_only", base_only), ("neither", neither))
                  if carries_image(c)]
    kind = type(model.model).__name__
    if with_image and not is_ip2p(model):
        raise EditLabError(
            f"the conditioning ({', '.join(with_image)}) carries an InstructPix2Pix image, but the model is "
            f"{kind}, not an InstructPix2Pix model. Load an InstructPix2Pix checkpoint (8 input channels; "
            f"ComfyUI detects it as {IP2P_MODEL_TYPES}), or encode plain text (CLIP Text Encode) for this model.")
    if is_ip2p(model) and not carries_image(both):
        raise EditLabError(
            f"the model is an InstructPix2Pix model ({kind}) but the 'both' conditioning carries no image, so "
            "the edit would ignore your photo. Make the three levels with 'InstructPix2Pix Encode' (or "
            "ComfyUI's InstructPixToPixConditioning) and connect both / image_only / neither in that order.")


class DualCFGCombiner(EditLabNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EditLabDualCFGCombiner",
            display_name="Dual CFG Combiner",
            category=DUAL_CFG_CATEGORY,
            description="Dual classifier-free guidance (InstructPix2Pix, Brooks et al. 2023, eq. 3): "
                        "neither + base_scale (base_only - neither) + extra_scale (both - base_only). "
                        "InstructPix2Pix: base = the input image, extra = the instruction (s_I = 1.5, s_T = 7.5). "
                        "Any pair works: base = your prompt, extra = an added condition (subject, style, "
                        "ControlNet). The three predictions run as one batched forward pass when memory allows. "
                        "Adds per-step scale schedules and guidance rescale (Lin et al. 2024). Use with "
                        "SamplerCustomAdvanced and any sampler.",
            inputs=[
                io.Model.Input("model", tooltip="The model to guide: an InstructPix2Pix model for image + instruction levels, any model for a prompt + extra condition pair."),
                io.Conditioning.Input("both", tooltip="Base + extra condition. IP2P: image + instruction "
                                                      "('both' of InstructPix2Pix Encode)."),
                io.Conditioning.Input("base_only", tooltip="Base condition only. IP2P: image + empty/negative text "
                                                           "('image_only' of InstructPix2Pix Encode)."),
                io.Conditioning.Input("neither", tooltip="No condition. IP2P: no image + empty/negative text "
                                                         "('neither' of InstructPix2Pix Encode)."),
                io.Float.Input("extra_scale", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="s_T: pull towards the extra condition (IP2P: follow the instruction "
                                       "harder). Paper default 7.5. At the start of the run if scheduled."),
                io.Float.Input("base_scale", default=1.5, min=0.0, max=100.0, step=0.05, round=0.01,
                               tooltip="s_I: pull towards the base condition (IP2P: keep more of the input "
                                       "image). Paper default 1.5 (reference CLI 1.2). 1 and extra_scale 1 = "
                                       "the plain 'both' prediction."),
                io.Combo.Input("schedule", options=list(SHAPES), default="constant",
                               tooltip="How both scales move from their start value (first step) to their end "
                                       "value (last step): constant (end values ignored), linear, cosine "
                                       "(flat near both ends)."),
                io.Float.Input("extra_scale_end", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="s_T at the last step (linear / cosine schedule)."),
                io.Float.Input("base_scale_end", default=1.5, min=0.0, max=100.0, step=0.05, round=0.01,
                               tooltip="s_I at the last step (linear / cosine schedule)."),
                io.Float.Input("rescale", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Guidance rescale (Lin et al. 2024) against over-saturation at high "
                                       "scales: matches the guided prediction's spread to the 'both' "
                                       "prediction's, in v space. 0 = off, 0.7 = the paper's value."),
            ],
            outputs=[io.Guider.Output(tooltip="Use with SamplerCustomAdvanced and any sampler.")],
        )

    @classmethod
    def execute(cls, model, both, base_only, neither, extra_scale, base_scale, schedule, extra_scale_end,
                base_scale_end, rescale) -> io.NodeOutput:
        # Flow models with real CFG (SD3.x) combine denoised predictions exactly as k-space ones do; a
        # guidance-distilled model (Flux-dev) has no unconditional 'neither' prediction to contrast with.
        refuse_no_uncond("Dual CFG Combiner", model.model, model_sampling(model),
                         "dual classifier-free guidance (it contrasts three predictions, one unconditional) does "
                         "not apply")
        check_pairing(model, both, base_only, neither)
        if "sampler_cfg_function" in model.model_options:
            raise EditLabError(
                "the model carries a two-way CFG replacement (e.g. from RescaleCFG or a CFG-modifying node), "
                "which cannot combine three predictions. Remove that node; for rescale, use this node's "
                "'rescale' input.")
        if rescale > 0.0 and not is_k_space(model_sampling(model)):
            raise EditLabError(
                "guidance rescale is defined for models that noise as x0 + sigma * noise (eps / v prediction: "
                "SD1.x, SD2.x, SDXL); this model uses another parametrisation. Set rescale to 0.")
        for name, value in (("extra_scale", extra_scale), ("base_scale", base_scale),
                            ("extra_scale_end", extra_scale_end), ("base_scale_end", base_scale_end)):
            if not math.isfinite(float(value)):
                raise EditLabError(f"{name} must be a finite number, got {value}")
        check_choice(schedule, SHAPES, "schedule")
        combiner = DualCFG(ScaleSchedule(extra_scale, extra_scale_end, schedule),
                           ScaleSchedule(base_scale, base_scale_end, schedule), rescale=float(rescale))
        guider = DualCFGCombinerGuider(model, combiner)
        guider.set_conds(both, base_only, neither)
        return io.NodeOutput(guider)


NODES = [InstructPix2PixEncode, DualCFGCombiner]
