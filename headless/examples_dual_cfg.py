"""Example workflows for dual classifier-free guidance (InstructPix2Pix and any two-condition pair).

Merged into ``examples.EXAMPLES``; same style (see builder.py).
"""
from __future__ import annotations

from typing import Callable

from .builder import Graph

IP2P_CHECKPOINT = "instruct-pix2pix-00-22000.safetensors"
SD15_CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
PHOTO_IMAGE = "editlab_photo.png"
INSTRUCTION = "turn it into a watercolor painting"

_SCALES_NOTE = (
    "* **extra_scale = s_T** (text guidance, paper 7.5): how hard the result follows the instruction.\n"
    "* **base_scale = s_I** (image guidance, paper 1.5; reference CLI 1.2): how much of the photo is kept.\n"
    "  Edit too weak? raise s_T or lower s_I. Photo lost? raise s_I or lower s_T.\n"
)


def _ip2p_inputs(g: Graph, column: int = 0, out: dict | None = None):
    """Checkpoint + photo + InstructPix2Pix Encode; ``out`` (if given) also receives the photo as 'image'."""
    model, clip, vae = g.add("CheckpointLoaderSimple", column, ckpt_name=IP2P_CHECKPOINT)
    image, _mask = g.add("LoadImage", column, image=PHOTO_IMAGE)
    both, image_only, neither, latent = g.add("EditLabInstructPix2PixEncode", column + 1, clip=clip, vae=vae,
                                              image=image, instruction=INSTRUCTION, negative="")
    if out is not None:
        out["image"] = image
    return model, vae, both, image_only, neither, latent


def ip2p_edit(info: dict) -> dict:
    g = Graph(info, stages=["load", "encode (three levels)", "dual CFG guidance", "sample", "decode and save"])
    g.note(
        "## InstructPix2Pix: edit a photo with an instruction\n\n"
        "Brooks et al., *InstructPix2Pix*, CVPR 2023. Three predictions per step - neither condition,\n"
        "the image only, image + instruction - combined with two scales (one batched forward pass).\n\n"
        f"* **Load Checkpoint**: an InstructPix2Pix checkpoint (`{IP2P_CHECKPOINT}`; SDXL-based\n"
        "  instruct-pix2pix edit checkpoints work too). A normal checkpoint gets a clear error.\n"
        "* **InstructPix2Pix Encode**: photo + instruction -> the three levels, wired in order.\n"
        "  Phrase the edit as an instruction: 'make it winter', not 'a winter scene'.\n"
        + _SCALES_NOTE +
        "* **schedule**: move both scales from start to end over the run (e.g. s_T 9 -> 5).\n"
        "* **rescale** 0.5-0.7 tames over-saturated colours at high s_T.\n"
        "* Sampler: the reference uses Euler ancestral; any sampler works.",
        width=480)
    model, vae, both, image_only, neither, latent = _ip2p_inputs(g)
    (guider,) = g.add("EditLabDualCFGCombiner", 2, model=model, both=both, base_only=image_only, neither=neither,
                      extra_scale=7.5, base_scale=1.5)
    (sampler,) = g.add("KSamplerSelect", 2, sampler_name="euler_ancestral")
    (sigmas,) = g.add("BasicScheduler", 2, model=model, scheduler="normal", steps=30, denoise=1.0)
    (noise,) = g.add("RandomNoise", 2)
    out, decoded = g.sample_decode(3, noise=noise, guider=guider, sampler=sampler, sigmas=sigmas,
                                   latent=latent, vae=vae, prefix="editlab_ip2p", decode_column=4)
    return g.to_json()


IMAGE_SCALES = (1.0, 1.5, 2.0)
TEXT_SCALES = (3.0, 7.5, 12.0)


def ip2p_scale_sweep(info: dict) -> dict:
    g = Graph(info, stages=["load", "encode (three levels)", "sampling settings"]
              + [f"row s_I = {s_i}: s_T {', '.join(map(str, TEXT_SCALES))}" for s_i in IMAGE_SCALES for _ in range(3)])
    g.note(
        "## InstructPix2Pix: scale sweep (s_I x s_T)\n\n"
        "The same photo, instruction and seed, sampled for every pair of image scale s_I (rows:\n"
        f"{', '.join(map(str, IMAGE_SCALES))}) and text scale s_T (within a row, left to right:\n"
        f"{', '.join(map(str, TEXT_SCALES))}). Each row is saved as one batch of images.\n\n"
        "Read it like the paper's Fig. 4: down the rows the result stays closer to the photo; along a\n"
        "row the edit gets stronger. Pick the pair you like and use it in the edit workflow.\n\n"
        + _SCALES_NOTE,
        width=480)
    ip2p_sweep_rows(g, _ip2p_inputs(g))
    return g.to_json()


def ip2p_sweep_rows(g: Graph, inputs: tuple) -> list:
    """One row per s_I (IMAGE_SCALES), one image per s_T (TEXT_SCALES) within it, each row saved as a batch;
    the rows' IMAGE batches are returned (the scored sweep measures them)."""
    image_scales, text_scales = IMAGE_SCALES, TEXT_SCALES
    model, vae, both, image_only, neither, latent = inputs
    (sampler,) = g.add("KSamplerSelect", 2, sampler_name="euler_ancestral")
    (sigmas,) = g.add("BasicScheduler", 2, model=model, scheduler="normal", steps=20, denoise=1.0)
    (noise,) = g.add("RandomNoise", 2)
    rows = []
    for row, s_i in enumerate(image_scales):
        images = None
        for s_t in text_scales:
            (guider,) = g.add("EditLabDualCFGCombiner", 3 + row * 3, title=f"s_I {s_i}, s_T {s_t}", model=model,
                              both=both, base_only=image_only, neither=neither, extra_scale=s_t, base_scale=s_i,
                              extra_scale_end=s_t, base_scale_end=s_i)
            out, decoded = g.sample_decode(4 + row * 3, noise=noise, guider=guider, sampler=sampler, sigmas=sigmas,
                                           latent=latent, vae=vae)
            if images is None:
                images = decoded
            else:
                (images,) = g.add("ImageBatch", 5 + row * 3, image1=images, image2=decoded)
        g.add("SaveImage", 5 + row * 3, title=f"row s_I = {s_i}", images=images,
              filename_prefix=f"editlab_ip2p_sweep_sI{s_i}")
        rows.append(images)
    return rows


def extra_condition_balance(info: dict) -> dict:
    g = Graph(info, stages=["load", "encode prompts", "dual CFG guidance", "sample", "decode and save"])
    g.note(
        "## Dual CFG beyond InstructPix2Pix: a prompt vs an extra condition\n\n"
        "The Dual CFG Combiner balances any *with / without an extra condition* pair with its own\n"
        "scale. Here the base is the prompt and the extra condition is a style phrase appended to it\n"
        "(Conditioning Concat); the photo is restyled SDEdit-style (denoise 0.75).\n\n"
        "* **both** = prompt + style, **base_only** = prompt, **neither** = negative prompt.\n"
        "* **base_scale** = the prompt's CFG scale (7.5 as usual).\n"
        "* **extra_scale** = how strongly the style applies on top: equal to base_scale = plain CFG on\n"
        "  the combined prompt; lower = a lighter style; higher = a stronger one, same prompt strength.\n"
        "* Works the same for a ControlNet: both = conditioning through Apply ControlNet,\n"
        "  base_only = the same conditioning without it. (Subject-vs-text balance with the subject\n"
        "  encoder is the same wiring: both = text + subject, base_only = text only.)\n"
        "* Any checkpoint (SD1.x / SDXL); any sampler.",
        width=480)
    model, clip, vae = g.add("CheckpointLoaderSimple", 0, ckpt_name=SD15_CHECKPOINT)
    image, _mask = g.add("LoadImage", 0, image=PHOTO_IMAGE)
    (prompt,) = g.add("CLIPTextEncode", 1, title="Base: prompt", text="a photo of a house by a lake", clip=clip)
    (style,) = g.add("CLIPTextEncode", 1, title="Extra: style", text="in the style of van gogh, oil painting",
                     clip=clip)
    (negative,) = g.add("CLIPTextEncode", 1, title="Negative prompt", text="blurry, lowres, watermark", clip=clip)
    (both,) = g.add("ConditioningConcat", 2, title="Prompt + style", conditioning_to=prompt, conditioning_from=style)
    (latent,) = g.add("VAEEncode", 2, pixels=image, vae=vae)
    (guider,) = g.add("EditLabDualCFGCombiner", 2, model=model, both=both, base_only=prompt, neither=negative,
                      extra_scale=4.0, base_scale=7.5, extra_scale_end=4.0, base_scale_end=7.5)
    (sampler,) = g.add("KSamplerSelect", 3, sampler_name="euler")
    (sigmas,) = g.add("BasicScheduler", 3, model=model, scheduler="normal", steps=20, denoise=0.75)
    (noise,) = g.add("RandomNoise", 3)
    out, decoded = g.sample_decode(3, noise=noise, guider=guider, sampler=sampler, sigmas=sigmas,
                                   latent=latent, vae=vae, prefix="editlab_dual_cfg_extra_condition",
                                   decode_column=4)
    return g.to_json()


EXAMPLES: dict[str, Callable[[dict], dict]] = {
    "InstructPix2Pix - edit a photo (dual CFG)": ip2p_edit,
    "InstructPix2Pix - scale sweep grid (s_I x s_T)": ip2p_scale_sweep,
    "Dual CFG - prompt vs extra condition balance": extra_condition_balance,
}

EXAMPLE_INPUTS = {"images": [PHOTO_IMAGE], "checkpoints": [IP2P_CHECKPOINT, SD15_CHECKPOINT]}
