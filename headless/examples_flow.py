"""Example workflows for the flow-model editing methods: FlowEdit and RF-Inversion, on SD3.5 and Flux.

Merged into ``examples.EXAMPLES``; same style (see builder.py). docs/methods.md §11.
"""
from __future__ import annotations

from typing import Callable

from .builder import Graph, Out
from .examples import PHOTO_IMAGE

SD35_CHECKPOINT = "sd3.5_medium.safetensors"
SD3_TEXT_ENCODERS = ("clip_l.safetensors", "clip_g.safetensors", "t5xxl_fp16.safetensors")
FLUX_UNET = "flux1-dev.safetensors"
FLUX_TEXT_ENCODERS = ("clip_l.safetensors", "t5xxl_fp16.safetensors")
FLUX_VAE = "ae.safetensors"
SOURCE = "a photo of a cat sitting on a wooden bench"
TARGET = "a photo of a fox sitting on a wooden bench"

_FLOWEDIT_KNOBS = (
    "* **n_max** (FlowEdit Sampler): how many of the *last* steps edit. It sets where the edit starts:\n"
    "  at `sigmas[steps - n_max]`. **Nothing changes? raise n_max** (or the target scale); the image\n"
    "  falls apart? lower it. n_max = steps starts from pure noise (the source is barely kept).\n"
    "* **shift** (ModelSamplingSD3 / ModelSamplingFlux): n_max counts *steps*, not noise. A larger\n"
    "  shift puts more steps at high noise, so the same n_max starts noisier = a stronger edit; a\n"
    "  smaller shift makes it weaker. Keep the shift you tuned n_max with.\n"
    "* **source / target scale** (FlowEdit Guider): the target scale is the edit's push; the source\n"
    "  scale should stay low. n_min > 0 ends with ordinary sampling (sharper, less faithful);\n"
    "  n_avg > 1 averages noise draws (two model passes each).\n"
    "* Prompts: describe the photo in the source prompt and change only the words to edit in the target.\n"
    "* Noise = Disable Noise: FlowEdit draws its own noise from the sampler's seed; the latent is the\n"
    "  encoded photo itself (no inversion).\n"
)


def _photo(g: Graph, vae: Out, column: int = 0) -> tuple[Out, Out]:
    image, _mask = g.add("LoadImage", column, image=PHOTO_IMAGE)
    (latent,) = g.add("VAEEncode", column + 1, pixels=image, vae=vae)
    return image, latent


def _flowedit_tail(g: Graph, column: int, model: Out, guider: Out, vae: Out, latent: Out, *, steps: int, n_max: int,
                   seed: int, prefix: str) -> None:
    (sampler,) = g.add("EditLabFlowEditSampler", column, n_max=n_max, n_min=0, n_avg=1, seed=seed)
    (sigmas,) = g.add("BasicScheduler", column, model=model, scheduler="simple", steps=steps, denoise=1.0)
    (off,) = g.add("DisableNoise", column)
    g.sample_decode(column + 1, noise=off, guider=guider, sampler=sampler, sigmas=sigmas, latent=latent, vae=vae,
                    prefix=prefix)


def flowedit_sd35(info: dict) -> dict:
    g = Graph(info, stages=["load", "encode", "FlowEdit guider", "FlowEdit sampler", "sample, decode and save"])
    g.note(
        "## FlowEdit on SD3.5: edit a photo without inversion\n\n"
        "Kulikov et al., *FlowEdit*, 2025. The photo is never inverted: starting from it n_max steps before\n"
        "the end, each step moves it by the difference of the target and source velocities at a noised copy\n"
        "of the photo, so what both prompts share stays put. Two model passes per step.\n\n"
        f"* **Load Checkpoint**: `{SD35_CHECKPOINT}` (model + VAE); the text encoders come from Triple\n"
        "  CLIP Loader (CLIP-L, CLIP-G, T5-XXL).\n"
        "* Settings: the authors' SD3 values - 50 steps, n_max 33, source CFG 3.5, target CFG 13.5,\n"
        "  an empty negative prompt, shift 3 (the model's own).\n"
        + _FLOWEDIT_KNOBS,
        width=520)
    model, clip, vae = _sd35_loaders(g)
    _image, latent = _photo(g, vae)
    (src,) = g.add("CLIPTextEncode", 1, title="Source prompt (describe the photo)", text=SOURCE, clip=clip)
    (tar,) = g.add("CLIPTextEncode", 1, title="Target prompt (the edit)", text=TARGET, clip=clip)
    (neg,) = g.add("CLIPTextEncode", 1, title="Negative prompt (empty)", text="", clip=clip)
    (guider,) = g.add("EditLabFlowEditGuider", 2, model=model, source=src, target=tar, source_scale=3.5,
                      target_scale=13.5, negative=neg)
    _flowedit_tail(g, 3, model, guider, vae, latent, steps=50, n_max=33, seed=42, prefix="editlab_flowedit_sd35")
    return g.to_json()


def _sd35_loaders(g: Graph) -> tuple[Out, Out, Out]:
    """SD3.5 checkpoint (model + VAE), its three text encoders, the model's own shift 3."""
    base, _clip, vae = g.add("CheckpointLoaderSimple", 0, ckpt_name=SD35_CHECKPOINT)
    (clip,) = g.add("TripleCLIPLoader", 0, clip_name1=SD3_TEXT_ENCODERS[0], clip_name2=SD3_TEXT_ENCODERS[1],
                    clip_name3=SD3_TEXT_ENCODERS[2])
    (model,) = g.add("ModelSamplingSD3", 0, model=base, shift=3.0)
    return model, clip, vae


def _flux_loaders(g: Graph) -> tuple[Out, Out, Out]:
    (unet,) = g.add("UNETLoader", 0, unet_name=FLUX_UNET, weight_dtype="default")
    (clip,) = g.add("DualCLIPLoader", 0, clip_name1=FLUX_TEXT_ENCODERS[0], clip_name2=FLUX_TEXT_ENCODERS[1],
                    type="flux")
    (vae,) = g.add("VAELoader", 0, vae_name=FLUX_VAE)
    (model,) = g.add("ModelSamplingFlux", 0, model=unet, max_shift=1.15, base_shift=0.5, width=1024, height=1024)
    return model, clip, vae


def flowedit_flux(info: dict) -> dict:
    g = Graph(info, stages=["load", "encode", "FlowEdit guider", "FlowEdit sampler", "sample, decode and save"])
    g.note(
        "## FlowEdit on Flux-dev: edit a photo without inversion\n\n"
        "Kulikov et al., *FlowEdit*, 2025, on a guidance-distilled model: Flux-dev has no unconditional\n"
        "branch, so the two scales are the **guidance embedding** of each prompt (what FluxGuidance sets;\n"
        "the guider sets them itself) and each velocity is one model pass - as in the authors' code.\n\n"
        f"* Loaders: `{FLUX_UNET}` (Load Diffusion Model), CLIP-L + T5-XXL (Dual CLIP Loader, type flux),\n"
        f"  `{FLUX_VAE}`. ModelSamplingFlux: set width / height to your image's size (the shift grows with it).\n"
        "* Settings: the authors' Flux values - 28 steps, n_max 24, source guidance 1.5, target 5.5.\n"
        + _FLOWEDIT_KNOBS,
        width=520)
    model, clip, vae = _flux_loaders(g)
    _image, latent = _photo(g, vae)
    (src,) = g.add("CLIPTextEncode", 1, title="Source prompt (describe the photo)", text=SOURCE, clip=clip)
    (tar,) = g.add("CLIPTextEncode", 1, title="Target prompt (the edit)", text=TARGET, clip=clip)
    (guider,) = g.add("EditLabFlowEditGuider", 2, model=model, source=src, target=tar, source_scale=1.5,
                      target_scale=5.5)
    _flowedit_tail(g, 3, model, guider, vae, latent, steps=28, n_max=24, seed=10, prefix="editlab_flowedit_flux")
    return g.to_json()


def _rf_invert_save_edit(g: Graph, model: Out, vae: Out, latent: Out, src: Out, tar: Out, *, name: str, prefix: str,
                         negative: Out | None = None, cfg: float = 1.0) -> None:
    """RF-Inversion with the authors' settings (28 steps, gamma 0.5; eta 0.9 on steps 0-6, euler): invert,
    save the INVERSION, edit from it, decode and save (columns 2-5)."""
    inv, noise, sigmas = g.add("EditLabRFInversionInvert", 2, model=model, positive=src, latent=latent, steps=28,
                               scheduler="simple", gamma=0.5, seed=0)
    g.add("EditLabSaveInversion", 3, inversion=inv, filename_prefix=name, source_prompt="")
    extra = {"negative": negative} if negative is not None else {}
    (guider,) = g.add("EditLabRFInversionGuider", 4, model=model, inversion=inv, positive=tar, cfg=cfg, eta=0.9,
                      start_step=0, stop_step=7, **extra)
    (sampler,) = g.add("KSamplerSelect", 4, sampler_name="euler")
    (off,) = g.add("DisableNoise", 4)
    g.sample_decode(5, noise=off, guider=guider, sampler=sampler, sigmas=sigmas, latent=noise, vae=vae, prefix=prefix)


def rf_inversion_flux(info: dict) -> dict:
    g = Graph(info, stages=["load", "encode", "RF-Inversion (controlled forward ODE)", "save",
                            "edit guider (controlled reverse ODE)", "sample, decode and save"])
    g.note(
        "## RF-Inversion on Flux-dev: invert once, save, edit\n\n"
        "Rout et al., *Semantic Image Inversion and Editing using Rectified SDEs*, ICLR 2025.\n"
        "**Invert**: the flow ODE is run from the photo to noise while **gamma** pulls it toward a fixed\n"
        "noise sample (seed): the inverted latent is more typical noise, so it edits better. The INVERSION\n"
        "is saved to output/inversions/ (Load Inversion reuses it for other edits, no re-inversion).\n"
        "**Edit**: sampling the target prompt from it, **eta** pulls each step toward the photo on the\n"
        "window start_step .. stop_step - 1 (0 = the noisiest step); after the window the prompt decides.\n\n"
        "* Authors' settings: 28 steps, gamma 0.5, empty source prompt with guidance 0, eta 0.9 on\n"
        "  steps 0-6 (a quarter), target FluxGuidance 3.5, the euler sampler.\n"
        "* **Nothing changes** (you get the photo back)? eta too high or the window too long: lower eta\n"
        "  (0.7-0.8) or stop_step (4-5). **Photo lost**? raise eta or stop_step, or gamma lower.\n"
        "* **shift** (ModelSamplingFlux): the window counts steps; a larger shift spends more steps at\n"
        "  high noise, so the same window holds the photo longer. Invert and edit with the same model\n"
        "  and shift (the guider checks the model; the SIGMAS must be the inversion's).\n"
        "* Real CFG (cfg > 1 with a negative) only on models that have it (SD3.x); Flux-dev refuses it.",
        width=520)
    model, clip, vae = _flux_loaders(g)
    _image, latent = _photo(g, vae)
    (empty,) = g.add("CLIPTextEncode", 1, title="Source prompt (empty, as the authors)", text="", clip=clip)
    (src,) = g.add("FluxGuidance", 1, conditioning=empty, guidance=0.0)
    (tar_text,) = g.add("CLIPTextEncode", 1, title="Target prompt (the edit)", text=TARGET, clip=clip)
    (tar,) = g.add("FluxGuidance", 1, conditioning=tar_text, guidance=3.5)
    _rf_invert_save_edit(g, model, vae, latent, src, tar, name="rf_inversion", prefix="editlab_rf_inversion_flux")
    return g.to_json()


def rf_inversion_sd35(info: dict) -> dict:
    g = Graph(info, stages=["load", "encode", "RF-Inversion (controlled forward ODE)", "save",
                            "edit guider (controlled reverse ODE)", "sample, decode and save"])
    g.note(
        "## RF-Inversion on SD3.5: invert once, save, edit (with real CFG)\n\n"
        "Rout et al., ICLR 2025, on a flow model that keeps its unconditional branch: the edit may use\n"
        "real classifier-free guidance (cfg > 1 with a negative prompt), unlike Flux-dev.\n"
        "**Invert** with gamma toward a seeded noise sample (empty source prompt, cfg 1), save the\n"
        "INVERSION, **edit** with eta pulling each step of the window toward the photo.\n\n"
        f"* **Load Checkpoint**: `{SD35_CHECKPOINT}`; text encoders from Triple CLIP Loader.\n"
        "* Settings: the authors' values transferred from Flux (they publish Flux only): 28 steps,\n"
        "  gamma 0.5, eta 0.9 on steps 0-6; target cfg 3.5 with an empty negative; shift 3.\n"
        "* **Nothing changes** (you get the photo back)? lower eta (0.7-0.8) or stop_step (4-5).\n"
        "  **Photo lost**? raise eta or stop_step, or lower gamma.\n"
        "* **shift** (ModelSamplingSD3): the window counts steps; keep the same model and shift for\n"
        "  inverting and editing (the SIGMAS must be the inversion's).",
        width=520)
    model, clip, vae = _sd35_loaders(g)
    _image, latent = _photo(g, vae)
    (src,) = g.add("CLIPTextEncode", 1, title="Source prompt (empty, as the authors)", text="", clip=clip)
    (tar,) = g.add("CLIPTextEncode", 1, title="Target prompt (the edit)", text=TARGET, clip=clip)
    (neg,) = g.add("CLIPTextEncode", 1, title="Negative prompt (empty)", text="", clip=clip)
    _rf_invert_save_edit(g, model, vae, latent, src, tar, name="rf_inversion_sd35",
                         prefix="editlab_rf_inversion_sd35", negative=neg, cfg=3.5)
    return g.to_json()


EXAMPLES: dict[str, Callable[[dict], dict]] = {
    "FlowEdit - SD3.5 photo edit (no inversion)": flowedit_sd35,
    "FlowEdit - Flux-dev photo edit (no inversion)": flowedit_flux,
    "RF-Inversion - Flux-dev invert, save, edit": rf_inversion_flux,
    "RF-Inversion - SD3.5 invert, save, edit (real CFG)": rf_inversion_sd35,
}
