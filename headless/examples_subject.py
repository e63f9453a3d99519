"""Example workflows for BLIP-Diffusion subject-driven generation (METHODS.md §7).

Merged into ``examples.EXAMPLES``; same style (see builder.py).
"""
from __future__ import annotations

from typing import Callable

from .builder import Graph

SUBJECT_FOLDER = "blipdiffusion"  # models/blip_diffusion/blipdiffusion/ (the release folder, diffusers layout)
SUBJECT_CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
SUBJECT_IMAGE = "editlab_photo.png"
NEGATIVE = ("over-exposure, under-exposure, saturated, duplicate, out of frame, lowres, cropped, worst quality, "
            "low quality, jpeg artifacts, morbid, mutilated, ugly, bad anatomy, bad proportions, deformed, blurry")


def subject_zero_shot(info: dict) -> dict:
    g = Graph(info)
    g.note(
        "## BLIP-Diffusion: zero-shot subject-driven generation\n\n"
        "Li et al., *BLIP-Diffusion*, NeurIPS 2023. One photo of a subject becomes 16 subject embeddings that\n"
        "are spliced into the prompt; the rest is ordinary ComfyUI sampling - no fine-tuning.\n\n"
        f"* **Subject Encoder Loader**: the release folder under `models/blip_diffusion/` (`{SUBJECT_FOLDER}`:\n"
        "  `qformer/`, `image_processor/`, plus bert-base-uncased `vocab.txt` in `qformer/`).\n"
        "* **Load Checkpoint**: best results with the release's own UNet / text encoder / VAE (fine-tuned\n"
        "  jointly with the encoder; convert the folder to one SD1.5 checkpoint or load its parts with\n"
        "  UNETLoader / CLIPLoader / VAELoader). Any SD1.5 checkpoint runs, with weaker subject fidelity.\n"
        "* **Subject Encode**: the subject photo + its class word ('dog'). Encoded once, reused.\n"
        "* **Subject Prompt**: 'a {class} {prompt}' x 20 cut to 61 tokens, subject after 'a'. Set\n"
        "  **target_class** to re-render the subject as another category. The report shows the budget.\n"
        "* Reference: 50 steps (PNDM; ddim/euler here), CFG 7.5, 512 x 512.",
        column=0, width=480)
    model, clip, vae = g.add("CheckpointLoaderSimple", 0, ckpt_name=SUBJECT_CHECKPOINT)
    image, _mask = g.add("LoadImage", 0, image=SUBJECT_IMAGE)
    (encoder,) = g.add("EditLabSubjectEncoderLoader", 1, folder=SUBJECT_FOLDER)
    (subject,) = g.add("EditLabSubjectEncode", 1, subject_encoder=encoder, image=image, class_word="dog")
    positive, negative, _report = g.add("EditLabSubjectPrompt", 2, clip=clip, subject=subject,
                                        prompt="swimming underwater", target_class="", prompt_strength=1.0,
                                        prompt_reps=20, negative_prompt=NEGATIVE)
    (latent,) = g.add("EmptyLatentImage", 2, width=512, height=512, batch_size=1)
    (out,) = g.add("KSampler", 3, model=model, positive=positive, negative=negative, latent_image=latent,
                   seed=88888, steps=50, cfg=7.5, sampler_name="ddim", scheduler="ddim_uniform", denoise=1.0)
    (decoded,) = g.add("VAEDecode", 3, samples=out, vae=vae)
    g.add("SaveImage", 3, images=decoded, filename_prefix="editlab_subject")
    return g.to_json()


EXAMPLES: dict[str, Callable[[dict], dict]] = {
    "Subject - zero-shot subject-driven generation (BLIP-Diffusion)": subject_zero_shot,
}
