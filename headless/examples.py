"""The pack's example workflows, as code (see builder.py). Each starts with a note on what to load.

File names are what the template browser shows; keep them stable once published.
"""
from __future__ import annotations

from typing import Callable

from .builder import Graph

CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
STROKE_IMAGE = "editlab_stroke.png"
PHOTO_IMAGE = "editlab_photo.png"


def _base(g: Graph, positive: str, negative: str = "blurry, lowres, watermark"):
    model, clip, vae = g.add("CheckpointLoaderSimple", 0, ckpt_name=CHECKPOINT)
    (pos,) = g.add("CLIPTextEncode", 1, title="Positive prompt", text=positive, clip=clip)
    (neg,) = g.add("CLIPTextEncode", 1, title="Negative prompt", text=negative, clip=clip)
    return model, clip, vae, pos, neg


def _guide_sample_save(g: Graph, column: int, model, pos, neg, noise, sampler, sigmas, latent, vae, prefix: str):
    """CFGGuider -> SamplerCustomAdvanced, then VAEDecode -> SaveImage in the next column: the common end of
    the SDEdit graphs."""
    (guider,) = g.add("CFGGuider", column, model=model, positive=pos, negative=neg, cfg=7.5)
    out, decoded = g.sample_decode(column, noise=noise, guider=guider, sampler=sampler, sigmas=sigmas,
                                   latent=latent, vae=vae, prefix=prefix, decode_column=column + 1)


def sdedit_stroke_painting(info: dict) -> dict:
    g = Graph(info, stages=["load", "encode", "SDEdit: perturb to t0", "sample (reverse SDE)", "decode and save"])
    g.note(
        "## SDEdit: stroke painting -> realistic image\n\n"
        "Meng et al., *SDEdit*, ICLR 2022. The painting is noised to **t0** and denoised with the\n"
        "reverse SDE, so the result follows its layout and colours but looks real.\n\n"
        f"* **Load Checkpoint**: any SD1.x / SDXL checkpoint (`{CHECKPOINT}` here).\n"
        f"* **Load Image**: your stroke painting (`{STROKE_IMAGE}` here), ideally 512 px.\n"
        "* **t0** (SDE Perturb): 0.3-0.6 for strokes. Higher = more realistic, less faithful.\n"
        "* **repeat** (Reverse SDE Sampler): K > 1 re-runs perturb+denoise K times (paper: 3).\n"
        "* Swap the Reverse SDE Sampler for any KSamplerSelect sampler: the graph still works.",
        width=460)
    model, clip, vae, pos, neg = _base(g, "a photo of a mountain lake at sunset, detailed, realistic")
    image, _mask = g.add("LoadImage", 0, image=STROKE_IMAGE)
    (latent,) = g.add("VAEEncode", 1, pixels=image, vae=vae)
    noised, sigmas = g.add("EditLabSDEPerturb", 2, model=model, latent=latent, t0=0.5, steps=20)
    (sampler,) = g.add("EditLabReverseSDESampler", 2)
    (noise,) = g.add("DisableNoise", 2)
    _guide_sample_save(g, 3, model, pos, neg, noise, sampler, sigmas, noised, vae, "editlab_sdedit")
    return g.to_json()


def sdedit_masked_photo_edit(info: dict) -> dict:
    g = Graph(info, stages=["load", "encode", "SDEdit: perturb, masked sampler", "sample", "decode and save"])
    g.note(
        "## Masked SDEdit: paint strokes onto a photo, regenerate only there\n\n"
        "Paint over a photo, then erase (make transparent) the area to change in the mask editor:\n"
        "LoadImage's MASK is 1 where the image is transparent = the region to regenerate.\n"
        "Outside the mask the result equals the photo exactly.\n\n"
        "* **known_noise**: same = SDEdit (one noise draw); fresh = a new draw each step (smoother seams).\n"
        "* **replace_on**: where the kept region is written back (x_t, x0 prediction, or both).\n"
        "* The Known-Region Sampler wraps *any* sampler; the guide input must be the clean latent.",
        width=460)
    model, clip, vae, pos, neg = _base(g, "a photo of a red sailing boat on a lake")
    image, mask = g.add("LoadImage", 0, image=PHOTO_IMAGE)
    (latent,) = g.add("VAEEncode", 1, pixels=image, vae=vae)
    noised, sigmas = g.add("EditLabSDEPerturb", 2, model=model, latent=latent, t0=0.6, steps=20)
    (inner,) = g.add("EditLabReverseSDESampler", 2)
    (sampler,) = g.add("EditLabKnownRegionSampler", 2, sampler=inner, mask=mask, guide=latent, known_noise="same")
    (noise,) = g.add("DisableNoise", 2)
    _guide_sample_save(g, 3, model, pos, neg, noise, sampler, sigmas, noised, vae, "editlab_masked_sdedit")
    return g.to_json()


def sdedit_t0_search(info: dict) -> dict:
    g = Graph(info, stages=["load", "encode", "t0 search", "decode, save and show"])
    g.note(
        "## SDEdit t0 search: the most realistic result within a faithfulness budget\n\n"
        "Bisection over t0 with a fixed seed (at most *max_runs* samplings). With a VAE connected the\n"
        "distance is the pixel mean squared error to the guide on [0, 1] (0.01 ~ PSNR 20 dB).\n"
        "The chosen t0 and its distance are shown by the preview nodes; reuse t0 in SDE Perturb.",
        width=460)
    model, clip, vae, pos, neg = _base(g, "a photo of a mountain lake at sunset, detailed, realistic")
    image, _mask = g.add("LoadImage", 0, image=STROKE_IMAGE)
    (latent,) = g.add("VAEEncode", 1, pixels=image, vae=vae)
    (sampler,) = g.add("EditLabReverseSDESampler", 2)
    result, t0, dist = g.add("EditLabSDEditT0Search", 2, model=model, positive=pos, negative=neg, sampler=sampler,
                             guide=latent, vae=vae, budget=0.02, steps=20, max_runs=8)
    (decoded,) = g.add("VAEDecode", 3, samples=result, vae=vae)
    g.add("SaveImage", 3, images=decoded, filename_prefix="editlab_t0_search")
    g.add("PreviewAny", 3, title="chosen t0", source=t0)
    g.add("PreviewAny", 3, title="distance", source=dist)
    return g.to_json()


def glide_inpaint(info: dict) -> dict:
    g = Graph(info, stages=["load", "encode", "inpainting sampler", "sample", "decode and save"])
    g.note(
        "## GLIDE-style inpainting with an ordinary (non-inpainting) checkpoint\n\n"
        "Nichol et al., *GLIDE*, 2022: every step, the known region is replaced by the photo noised to\n"
        "the current level with a **fresh** draw, on x_t and on the x0 prediction.\n"
        "ComfyUI's own noise mask (SetLatentNoiseMask) reuses one fixed draw; use it for speed, use\n"
        "this when seams show. For dedicated inpainting checkpoints use ComfyUI's InpaintModelConditioning.\n\n"
        "* Mask: LoadImage's alpha (transparent = regenerate). Flip *mask_convention* for GLIDE masks.\n"
        "* Works with any sampler from KSamplerSelect.",
        width=460)
    model, clip, vae, pos, neg = _base(g, "a wooden cabin by the lake")
    image, mask = g.add("LoadImage", 0, image=PHOTO_IMAGE)
    (latent,) = g.add("VAEEncode", 1, pixels=image, vae=vae)
    (inner,) = g.add("KSamplerSelect", 2, sampler_name="euler_ancestral")
    (sampler,) = g.add("EditLabKnownRegionSampler", 2, sampler=inner, mask=mask, known_noise="fresh", replace_on="both")
    (sigmas,) = g.add("BasicScheduler", 2, model=model, scheduler="normal", steps=25, denoise=1.0)
    (noise,) = g.add("RandomNoise", 2)
    _guide_sample_save(g, 3, model, pos, neg, noise, sampler, sigmas, latent, vae, "editlab_glide_inpaint")
    return g.to_json()


EXAMPLES: dict[str, Callable[[dict], dict]] = {
    "SDEdit - stroke painting to image": sdedit_stroke_painting,
    "SDEdit - masked stroke edit of a photo": sdedit_masked_photo_edit,
    "SDEdit - t0 search (realism vs faithfulness)": sdedit_t0_search,
    "GLIDE-style inpainting (any checkpoint)": glide_inpaint,
}

# Inputs each example reads from ComfyUI's input folder (tests create them; users replace them).
EXAMPLE_INPUTS = {"images": [STROKE_IMAGE, PHOTO_IMAGE], "checkpoints": [CHECKPOINT]}

from .examples_dual_cfg import EXAMPLES as _DUAL_CFG, EXAMPLE_INPUTS as _DUAL_CFG_INPUTS  # noqa: E402

EXAMPLES.update(_DUAL_CFG)
EXAMPLE_INPUTS["checkpoints"] += [c for c in _DUAL_CFG_INPUTS["checkpoints"] if c not in EXAMPLE_INPUTS["checkpoints"]]

from .examples_p2p import EXAMPLES as _P2P  # noqa: E402

EXAMPLES.update(_P2P)

from .examples_inversion import EXAMPLES as _INVERSION  # noqa: E402

EXAMPLES.update(_INVERSION)

from .examples_subject import EXAMPLES as _SUBJECT  # noqa: E402

EXAMPLES.update(_SUBJECT)

from .examples_dreambooth import EXAMPLES as _DREAMBOOTH  # noqa: E402

EXAMPLES.update(_DREAMBOOTH)

from .examples_metrics import EXAMPLES as _METRICS  # noqa: E402

EXAMPLES.update(_METRICS)

from .examples_guidance import EXAMPLES as _GUIDANCE  # noqa: E402

EXAMPLES.update(_GUIDANCE)

from .examples_flow import EXAMPLES as _FLOW  # noqa: E402

EXAMPLES.update(_FLOW)
