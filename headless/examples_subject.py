"""Example workflows for BLIP-Diffusion subject-driven generation (docs/methods.md §7).

Merged into ``examples.EXAMPLES``; same style (see builder.py).
"""
from __future__ import annotations

from typing import Callable

from .builder import Graph

SUBJECT_FOLDER = "blipdiffusion"  # models/blip_diffusion/blipdiffusion/ (the release folder, diffusers layout)
SUBJECT_CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
SUBJECT_IMAGE = "editlab_photo.png"
EDIT_PHOTO, EDIT_SUBJECT = "editlab_photo.png", "editlab_subject.png"
STRUCTURE_IMAGE = "editlab_stroke.png"
CONTROLNET = "control_v11p_sd15_canny.safetensors"
STAGES = ["load", "encode subject", "subject prompt", "sample", "decode and save"]
# The real-photo edit (shared end: examples_inversion.edit_rows_from_inversion, columns 3-5).
REAL_PHOTO_STAGES = ["load", "encode", "invert and control", "edit (Inversion Guider)", "sample, decode and save",
                     "attention maps"]
NEGATIVE = ("over-exposure, under-exposure, saturated, duplicate, out of frame, lowres, cropped, worst quality, "
            "low quality, jpeg artifacts, morbid, mutilated, ugly, bad anatomy, bad proportions, deformed, blurry")


def _subject_prompt(g: Graph):
    """Checkpoint + subject photo -> Subject Encoder Loader -> Subject Encode -> Subject Prompt."""
    model, clip, vae = g.add("CheckpointLoaderSimple", 0, ckpt_name=SUBJECT_CHECKPOINT)
    image, _mask = g.add("LoadImage", 0, image=SUBJECT_IMAGE)
    (encoder,) = g.add("EditLabSubjectEncoderLoader", 1, folder=SUBJECT_FOLDER)
    (subject,) = g.add("EditLabSubjectEncode", 1, subject_encoder=encoder, image=image, class_word="dog")
    positive, negative, _report = g.add("EditLabSubjectPrompt", 2, clip=clip, subject=subject,
                                        prompt="swimming underwater", target_class="", prompt_strength=1.0,
                                        prompt_reps=20, negative_prompt=NEGATIVE)
    return model, clip, vae, positive, negative


def _generate(g: Graph, model, positive, negative, vae, prefix: str) -> None:
    """512 px text-to-image with the reference settings (50 DDIM steps, CFG 7.5), decoded and saved."""
    (latent,) = g.add("EmptyLatentImage", 2, width=512, height=512, batch_size=1)
    (out,) = g.add("KSampler", 3, model=model, positive=positive, negative=negative, latent_image=latent,
                   seed=88888, steps=50, cfg=7.5, sampler_name="ddim", scheduler="ddim_uniform", denoise=1.0)
    (decoded,) = g.add("VAEDecode", 4, samples=out, vae=vae)
    g.add("SaveImage", 4, images=decoded, filename_prefix=prefix)


def subject_zero_shot(info: dict) -> dict:
    g = Graph(info, stages=STAGES)
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
        width=480)
    model, clip, vae, positive, negative = _subject_prompt(g)
    _generate(g, model, positive, negative, vae, "editlab_subject")
    return g.to_json()


def subject_vs_text_balance(info: dict) -> dict:
    g = Graph(info, stages=["load", "encode subject", "prompts", "dual CFG guidance", "sample", "decode and save"])
    g.note(
        "## Subject vs text: two scales with the Dual CFG Combiner\n\n"
        "BLIP-Diffusion's prompt carries the subject *and* the text. The Dual CFG Combiner separates them:\n"
        "**neither** = the negative prompt, **base_only** = the text prompt alone, **both** = text + subject.\n"
        "`base_scale` is then the text's guidance (7.5 as usual) and `extra_scale` the subject's: raise it\n"
        "for subject fidelity, lower it when the subject overrides the prompt (swimming, style, scene).\n"
        "The same pattern balances any 'with / without an extra condition' pair.",
        width=480)
    model, clip, vae, both, negative = _subject_prompt(g)
    (text_only,) = g.add("CLIPTextEncode", 2, title="Text only (same prompt, no subject)",
                         text="a dog swimming underwater", clip=clip)
    (guider,) = g.add("EditLabDualCFGCombiner", 3, model=model, both=both, base_only=text_only, neither=negative,
                      extra_scale=5.0, base_scale=7.5)
    (latent,) = g.add("EmptyLatentImage", 2, width=512, height=512, batch_size=1)
    (noise,) = g.add("RandomNoise", 3, noise_seed=88888)
    (sampler,) = g.add("KSamplerSelect", 3, sampler_name="ddim")
    (sigmas,) = g.add("BasicScheduler", 3, model=model, scheduler="ddim_uniform", steps=50, denoise=1.0)
    out, decoded = g.sample_decode(4, noise=noise, guider=guider, sampler=sampler, sigmas=sigmas,
                                   latent=latent, vae=vae, prefix="editlab_subject_vs_text", decode_column=5)
    return g.to_json()


def subject_with_controlnet(info: dict) -> dict:
    g = Graph(info, stages=["load", "encode subject", "subject prompt + ControlNet", "sample", "decode and save"])
    g.note(
        "## Subject + structure: BLIP-Diffusion with a ControlNet\n\n"
        "The subject comes from the spliced subject embeddings; the layout comes from a ControlNet on the\n"
        "same conditioning (ComfyUI's own Apply ControlNet). Use an edge / depth map of the scene you want.\n\n"
        f"* **Load ControlNet Model**: an SD1.5 ControlNet (`{CONTROLNET}` here).\n"
        "* **Load Image (structure)**: the control image, already preprocessed (e.g. canny edges).\n"
        "* **strength** 0.6-1.0: how strictly the structure is followed.",
        width=480)
    model, clip, vae, positive, negative = _subject_prompt(g)
    (control,) = g.add("ControlNetLoader", 0, control_net_name=CONTROLNET)
    structure, _m = g.add("LoadImage", 0, title="Load Image (structure)", image=STRUCTURE_IMAGE)
    c_pos, c_neg = g.add("ControlNetApplyAdvanced", 2, positive=positive, negative=negative, control_net=control,
                         image=structure, strength=0.8, start_percent=0.0, end_percent=1.0, vae=vae)
    _generate(g, model, c_pos, c_neg, vae, "editlab_subject_controlnet")
    return g.to_json()


def subject_edit_real_photo(info: dict) -> dict:
    from .examples_inversion import edit_rows_from_inversion  # lazy: at module level it cycles via examples.py

    g = Graph(info, stages=REAL_PHOTO_STAGES)
    g.note(
        "## Subject-driven editing of a real photo (BLIP-Diffusion + inversion + Prompt-to-Prompt)\n\n"
        "Replace the dog in *your photo* with *your* dog (or any subject): the photo is DDIM-inverted with its\n"
        "prompt, then [source, target] are sampled from the inverted noise. The target row is the photo's\n"
        "prompt with the subject's 16 vectors before the subject word; the attention controller (refine,\n"
        "cross 0.8 / self 0.4) keeps the photo's layout and **local blend** confines the change to where the\n"
        "subject word attends. Output: the reconstruction, then the edit; attention maps show the subject.\n\n"
        "* **Subject Edit Pair**: `source` = the photo's prompt (the same as the inversion's), naming the\n"
        "  object ('dog'); `target_class` renames it (a cat subject: 'cat'); `subject_weight` > 1 = more subject.\n"
        "* **Inversion Guider**: `direct` (exact source, no optimisation: seconds); `null-text` after a\n"
        "  Null-Text Optimize node; `plain` is the reference's plain DDIM inversion (drifts at CFG 7.5).\n"
        "* Invert with the *plain* model, sample with the controlled one; euler on DDIM Invert's SIGMAS.",
        width=520)
    model, clip, vae = g.add("CheckpointLoaderSimple", 0, ckpt_name=SUBJECT_CHECKPOINT)
    photo, _mask = g.add("LoadImage", 0, title="Load Image (photo to edit)", image=EDIT_PHOTO)
    subject_image, _m2 = g.add("LoadImage", 0, title="Load Image (subject)", image=EDIT_SUBJECT)
    (encoder,) = g.add("EditLabSubjectEncoderLoader", 1, folder=SUBJECT_FOLDER)
    (subject,) = g.add("EditLabSubjectEncode", 1, subject_encoder=encoder, image=subject_image, class_word="dog")
    (latent,) = g.add("VAEEncode", 1, pixels=photo, vae=vae)
    source = "a dog sitting on the grass"
    (src,) = g.add("CLIPTextEncode", 1, title="Source prompt (for the inversion)", text=source, clip=clip)
    (negative,) = g.add("CLIPTextEncode", 1, title="Negative prompt (empty = the paper's)", text="", clip=clip)
    pair, edit, _report = g.add("EditLabSubjectEditPair", 2, clip=clip, subject=subject, source=source,
                                subject_word="dog", target_class="", local_blend=True, subject_weight=1.0)
    inv, noise, sigmas = g.add("EditLabDDIMInvert", 2, model=model, positive=src, latent=latent, steps=50)
    (controlled,) = g.add("EditLabAttentionController", 2, model=model, edit=edit, cross_replace_steps=0.8,
                          self_replace_steps=0.4, start_blend=0.2)
    edit_rows_from_inversion(g, model=controlled, inv=inv, positive=pair, negative=negative, noise=noise,
                             sigmas=sigmas, edit=edit, latent=latent, vae=vae, mode="direct",
                             prefix="editlab_subject_edit")
    return g.to_json()


EXAMPLES: dict[str, Callable[[dict], dict]] = {
    "Subject - edit a real photo (BLIP-Diffusion + inversion + Prompt-to-Prompt)": subject_edit_real_photo,
    "Subject - with ControlNet structure (BLIP-Diffusion)": subject_with_controlnet,
    "Subject - zero-shot subject-driven generation (BLIP-Diffusion)": subject_zero_shot,
    "Dual CFG - subject vs text balance (BLIP-Diffusion)": subject_vs_text_balance,
}
