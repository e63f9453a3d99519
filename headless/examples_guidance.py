"""Example workflows for gradient guidance: CLIP guidance (GLIDE) and image prompts (docs/methods.md §10).

Merged into ``examples.EXAMPLES``; same style (see builder.py).
"""
from __future__ import annotations

from typing import Callable

from .builder import Graph

CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
PHOTO_IMAGE = "editlab_photo.png"
STROKE_IMAGE = "editlab_stroke.png"
CLIP_FOLDER = "clip-vit-large-patch14"

_CLIP_NOTE = (
    f"* **CLIP Guidance Loss**: a Hugging Face CLIPModel folder in `models/editlab_metrics/{CLIP_FOLDER}/`\n"
    "  (the metric nodes' CLIP; ViT-B/32 or B/16 folders work too and are faster), or ComfyUI's\n"
    "  CLIP_VISION (Load CLIP Vision) with clip_model = (none), for image prompts.\n"
    "* **scale**: D_hat = D + s sigma^2 grad log p. Too little: no visible change; too much:\n"
    "  noisy, over-sharpened images. Try 50-1000 and look.\n"
    "* **gradient_through**: x0 (through the VAE and CLIP only, cheap) or model (through the UNet\n"
    "  too, exact, about 3x a plain step). **every_k** 2-4 and **sigma_end** 0.6-0.8 save time.\n"
    "* This is an approximation of GLIDE's CLIP guidance (an ordinary CLIP on the decoded x0\n"
    "  prediction, not GLIDE's noise-aware CLIP).\n"
)


def _sampling(g: Graph, column: int, model, steps: int = 30, denoise: float = 1.0):
    (sampler,) = g.add("KSamplerSelect", column, sampler_name="euler")
    (sigmas,) = g.add("BasicScheduler", column, model=model, scheduler="karras", steps=steps, denoise=denoise)
    return sampler, sigmas


def clip_guided_text_to_image(info: dict) -> dict:
    prompt = "a watercolor painting of a lighthouse on a cliff at sunset"
    g = Graph(info, stages=["load", "encode prompt and loss", "guiders (CLIP only | CFG + CLIP)", "sample",
                            "decode and save"])
    g.note(
        "## CLIP guidance vs classifier-free guidance (the GLIDE comparison)\n\n"
        "Nichol et al., *GLIDE*, 2022 compare CLIP guidance with classifier-free guidance. Two runs from\n"
        "the same noise: **left** CLIP guidance alone (cfg 1 = no CFG), **right** CFG 7.5 + CLIP guidance.\n"
        "Saved as one batch of two images.\n\n"
        f"* **Load Checkpoint**: any SD1.x checkpoint (`{CHECKPOINT}` here); SD2.x / SDXL / SD3 / Flux work too.\n"
        + _CLIP_NOTE,
        width=500)
    model, clip, vae = g.add("CheckpointLoaderSimple", 0, ckpt_name=CHECKPOINT)
    (pos,) = g.add("CLIPTextEncode", 1, title="Prompt", text=prompt, clip=clip)
    (neg,) = g.add("CLIPTextEncode", 1, title="Negative prompt", text="blurry, lowres, watermark", clip=clip)
    (loss,) = g.add("EditLabCLIPGuidanceLoss", 1, clip_model=CLIP_FOLDER, text=prompt, cutouts=16)
    (latent,) = g.add("EmptyLatentImage", 1, width=512, height=512, batch_size=1)
    sampler, sigmas = _sampling(g, 2, model)
    (noise,) = g.add("RandomNoise", 2, noise_seed=0)
    images = []
    for cfg, title in ((1.0, "CLIP guidance only (cfg 1)"), (7.5, "CFG 7.5 + CLIP guidance")):
        (guider,) = g.add("EditLabGradientGuider", 2, title=title, model=model, positive=pos, negative=neg, cfg=cfg,
                          loss=loss, scale=300.0, sigma_start=0.0, sigma_end=0.8, every_k=1, gradient_through="x0",
                          vae=vae)
        _out, decoded = g.sample_decode(3, noise=noise, guider=guider, sampler=sampler, sigmas=sigmas,
                                        latent=latent, vae=vae, decode_column=4)
        images.append(decoded)
    (both,) = g.add("ImageBatch", 4, image1=images[0], image2=images[1])
    g.add("SaveImage", 4, images=both, filename_prefix="editlab_clip_guidance_vs_cfg")
    return g.to_json()


def clip_image_prompt_sdedit(info: dict) -> dict:
    g = Graph(info, stages=["load", "encode, loss", "SDEdit: perturb to t0 + guider", "sample", "decode and save"])
    g.note(
        "## Image prompt: steer an SDEdit toward a reference image with CLIP\n\n"
        "SDEdit (Meng et al. 2022) keeps the photo's layout; CLIP guidance with a **reference image**\n"
        "pulls its look (style, colours, subject) toward the reference: the loss is the spherical\n"
        "distance between CLIP embeddings of cut-outs of the prediction and of the reference.\n\n"
        f"* **Load Image (photo)**: what to edit (`{PHOTO_IMAGE}`); **Load Image (reference)**: the look to\n"
        f"  move toward (`{STROKE_IMAGE}` here). Add a text to the loss to steer with both.\n"
        "* **t0** 0.5-0.7: how much of the photo may change.\n"
        + _CLIP_NOTE,
        width=500)
    model, clip, vae = g.add("CheckpointLoaderSimple", 0, ckpt_name=CHECKPOINT)
    photo, _mask = g.add("LoadImage", 0, title="Load Image (photo)", image=PHOTO_IMAGE)
    reference, _mask2 = g.add("LoadImage", 0, title="Load Image (reference)", image=STROKE_IMAGE)
    (pos,) = g.add("CLIPTextEncode", 1, title="Prompt", text="a photo", clip=clip)
    (neg,) = g.add("CLIPTextEncode", 1, title="Negative prompt", text="blurry, lowres, watermark", clip=clip)
    (loss,) = g.add("EditLabCLIPGuidanceLoss", 1, clip_model=CLIP_FOLDER, text="", image=reference, cutouts=16)
    (latent,) = g.add("VAEEncode", 1, pixels=photo, vae=vae)
    noised, sigmas = g.add("EditLabSDEPerturb", 2, model=model, latent=latent, t0=0.6, steps=20)
    (guider,) = g.add("EditLabGradientGuider", 2, model=model, positive=pos, negative=neg, cfg=5.0, loss=loss,
                      scale=300.0, sigma_start=0.0, sigma_end=0.8, every_k=1, gradient_through="x0", vae=vae)
    (sampler,) = g.add("KSamplerSelect", 2, sampler_name="euler")
    (noise,) = g.add("DisableNoise", 2)
    g.sample_decode(3, noise=noise, guider=guider, sampler=sampler, sigmas=sigmas, latent=noised, vae=vae,
                    prefix="editlab_clip_image_prompt_sdedit", decode_column=4)
    return g.to_json()


def p2p_real_photo_clip_nudge(info: dict) -> dict:
    from .examples_p2p import p2p_graph

    source, target = "a photo of a lake with a boat", "a photo of a lake with a swan"
    g = Graph(info, stages=["load", "encode", "invert and control", "edit guider + CLIP on the target row",
                            "sample, decode and save"])
    g.note(
        "## Real-photo edit nudged by CLIP guidance (direct inversion + Prompt-to-Prompt + CLIP)\n\n"
        "The photo is DDIM-inverted; [source, target] rows are sampled from the inverted noise with the\n"
        "Attention Controller and the Inversion Guider in **direct** mode (the source row reconstructs the\n"
        "photo exactly). **Gradient Guidance** adds CLIP guidance toward the target text on the target\n"
        "row only (**rows = 1**): where Prompt-to-Prompt's edit is too weak, CLIP pushes it further.\n\n"
        "* Describe the photo in the source prompt; change words in the target (same word count).\n"
        "* The sampler must be euler / ddim on DDIM Invert's SIGMAS.\n"
        + _CLIP_NOTE,
        width=520)
    model, clip, vae = g.add("CheckpointLoaderSimple", 0, ckpt_name=CHECKPOINT)
    image, _mask = g.add("LoadImage", 0, image=PHOTO_IMAGE)
    (latent,) = g.add("VAEEncode", 1, pixels=image, vae=vae)
    p = p2p_graph(g, source=source, target=target, mode="replace", cross_replace_steps=0.8, self_replace_steps=0.6,
                  start_blend=0.2, model=model, clip=clip, vae=vae)
    (src,) = g.add("CLIPTextEncode", 1, title="Source prompt (for the inversion)", text=source, clip=clip)
    (loss,) = g.add("EditLabCLIPGuidanceLoss", 1, clip_model=CLIP_FOLDER, text=target, cutouts=16)
    inv, noise, sigmas = g.add("EditLabDDIMInvert", 2, model=model, positive=src, latent=latent, steps=50)
    (rows,) = g.add("EditLabP2PLatentBatch", 3, latent=noise, edit=p["edit"])
    (edit_guider,) = g.add("EditLabInversionGuider", 3, model=p["model"], inversion=inv, positive=p["positive"],
                           negative=p["negative"], mode="direct", cfg=7.5)
    (guider,) = g.add("EditLabGradientGuidance", 3, guider=edit_guider, loss=loss, scale=200.0, sigma_start=0.0,
                      sigma_end=0.7, every_k=1, gradient_through="x0", rows="1", vae=vae)
    (off,) = g.add("DisableNoise", 3)
    (sampler,) = g.add("KSamplerSelect", 3, sampler_name="euler")
    out, _decoded = g.sample_decode(4, noise=off, guider=guider, sampler=sampler, sigmas=sigmas, latent=rows,
                                    vae=vae, prefix="editlab_p2p_real_clip_nudge")
    g.add("EditLabReconstructionPSNR", 4, title="Source row PSNR", reconstruction_latent=out, original_latent=latent)
    return g.to_json()


EXAMPLES: dict[str, Callable[[dict], dict]] = {
    "Gradient guidance - CLIP guidance vs CFG (GLIDE comparison)": clip_guided_text_to_image,
    "Gradient guidance - CLIP image prompt with SDEdit": clip_image_prompt_sdedit,
    "Gradient guidance - real photo P2P edit nudged by CLIP": p2p_real_photo_clip_nudge,
}
