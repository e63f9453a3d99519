"""Example workflows of the inversion suite (see examples.py for the conventions)."""
from __future__ import annotations

from typing import Callable

from .builder import Graph, Out
from .examples import CHECKPOINT, PHOTO_IMAGE

MODES = ("plain", "null-text", "negative-prompt", "direct")
SAVED_INVERSION = "output/inversion.safetensors"  # the fixed name 'Invert once and save' writes every run


def _invert(g: Graph, source: str, steps: int = 50):
    model, clip, vae = g.add("CheckpointLoaderSimple", 0, ckpt_name=CHECKPOINT)
    image, _mask = g.add("LoadImage", 0, image=PHOTO_IMAGE)
    (latent,) = g.add("VAEEncode", 1, pixels=image, vae=vae)
    (src,) = g.add("CLIPTextEncode", 1, title="Source prompt (describe the photo)", text=source, clip=clip)
    (empty,) = g.add("CLIPTextEncode", 1, title="Empty prompt", text="", clip=clip)
    inv, noise, sigmas = g.add("EditLabDDIMInvert", 2, model=model, positive=src, latent=latent, steps=steps)
    return model, clip, vae, image, latent, src, empty, inv, noise, sigmas


def _replay(g: Graph, column: int, model, inv, positive, negative, noise, sigmas, vae, mode: str, title: str):
    (guider,) = g.add("EditLabInversionGuider", column, title=f"Guider: {title}", model=model, inversion=inv,
                      positive=positive, negative=negative, mode=mode, cfg=7.5)
    (off,) = g.add("DisableNoise", column)
    (sampler,) = g.add("KSamplerSelect", column, sampler_name="euler")
    out, decoded = g.sample_decode(column, noise=off, guider=guider, sampler=sampler, sigmas=sigmas,
                                   latent=noise, vae=vae)
    return out, decoded


def invert_and_reconstruct(info: dict) -> dict:
    g = Graph(info, stages=["load", "encode", "invert"] + [f"replay: {m}" for m in MODES])
    g.note(
        "## Invert a photo and reconstruct it four ways\n\n"
        "DDIM inversion (50 steps, guidance 1) gives the pivot trajectory. Replaying it with CFG 7.5 drifts\n"
        "(*plain*); **null-text** optimisation (Mokady et al. 2023) fixes the drift with one optimised null\n"
        "embedding per step; **negative-prompt** inversion (Miyake et al. 2023) uses the source prompt as the\n"
        "negative, no optimisation; **direct** inversion (Ju et al. 2024) snaps the source row back onto the\n"
        "pivot every step and reconstructs exactly. Each branch reports its latent PSNR.\n\n"
        "* Use the same checkpoint for inversion and editing.\n"
        "* The sampler must be single-evaluation (euler / ddim) on DDIM Invert's SIGMAS, or on a tail of\n"
        "  them (SplitSigmas' low half): the guider then starts from the inversion's latent at that level.",
        width=520)
    model, clip, vae, image, latent, src, empty, inv, noise, sigmas = _invert(g, "a photo of a lake with a boat")
    (tuned,) = g.add("EditLabNullTextOptimize", 2, model=model, inversion=inv, negative=empty)
    for col, (mode, which) in enumerate(zip(MODES, (inv, tuned, inv, inv)), start=3):
        out, decoded = _replay(g, col, model, which, src, empty, noise, sigmas, vae, mode, mode)
        g.add("EditLabReconstructionPSNR", col, title=f"PSNR: {mode}", reconstruction_latent=out,
              original_latent=latent)
        g.add("SaveImage", col, images=decoded, filename_prefix=f"editlab_reconstruct_{mode}")
    return g.to_json()


def invert_once_and_save(info: dict) -> dict:
    g = Graph(info, stages=["load", "encode", "invert", "save"])
    g.note(
        "## Invert once, save, reuse\n\n"
        "Null-text inversion is the slow part (one optimisation per step). Save the result: every later edit\n"
        "loads it in a second (see *Inversion - load a saved inversion, two edits*). Files go to\n"
        "`output/inversions/`; copy them to `input/inversions/` to share them.\n\n"
        "* Save Inversion's **naming** is *fixed*: `output/inversions/inversion.safetensors`, replaced on\n"
        "  every run, so the load workflow always finds it. Choose *numbered* to keep every run\n"
        "  (`inversion_00001`, `inversion_00002`, ...), or change the prefix per photo.",
        width=460)
    model, clip, vae, image, latent, src, empty, inv, noise, sigmas = _invert(g, "a photo of a lake with a boat")
    (tuned,) = g.add("EditLabNullTextOptimize", 2, model=model, inversion=inv, negative=empty)
    (name,) = g.add("EditLabSaveInversion", 3, inversion=tuned, filename_prefix="inversion",
                    source_prompt="a photo of a lake with a boat")
    g.add("PreviewAny", 3, title="saved as", source=name)
    return g.to_json()


def load_and_edit_twice(info: dict) -> dict:
    g = Graph(info, stages=["load", "prompts", "edit 1", "edit 2"])
    g.note(
        "## Load a saved inversion and run two edits\n\n"
        f"Pick the file saved by *Inversion - invert once and save* (`{SAVED_INVERSION}` here: Save\n"
        "Inversion's fixed name; with naming *numbered*, pick the newest number). Each edit is a\n"
        "new target prompt sampled from the inversion's noise with the optimised null embeddings: no\n"
        "recomputation. For edits that keep the layout exactly, add the Prompt-to-Prompt attention\n"
        "controller (see the Prompt-to-Prompt workflows).",
        width=460)
    model, clip, vae = g.add("CheckpointLoaderSimple", 0, ckpt_name=CHECKPOINT)
    inv, noise, sigmas = g.add("EditLabLoadInversion", 0, inversion=SAVED_INVERSION, model=model)
    (empty,) = g.add("CLIPTextEncode", 1, title="Empty prompt", text="", clip=clip)
    for col, text in [(2, "a watercolor painting of a lake with a boat"), (3, "a photo of a lake with a swan")]:
        (target,) = g.add("CLIPTextEncode", 1, title=f"Edit: {text}", text=text, clip=clip)
        _out, decoded = _replay(g, col, model, inv, target, empty, noise, sigmas, vae, "null-text", text)
        g.add("SaveImage", col, images=decoded, filename_prefix="editlab_inversion_edit")
    return g.to_json()


EXAMPLES = {
    "Inversion - invert and reconstruct (all modes, PSNR)": invert_and_reconstruct,
    "Inversion - invert once and save": invert_once_and_save,
    "Inversion - load a saved inversion, two edits": load_and_edit_twice,
}


def _p2p_real_photo(info: dict, *, mode: str, note: str, prefix: str, blend_words: str,
                    self_replace_steps: float, then: Callable | None = None, extra_stages: tuple = ()) -> dict:
    """The real-photo Prompt-to-Prompt graph; ``then(g, ends)`` may add nodes (ends: image, mask, decoded rows,
    the prompts)."""
    from .examples_p2p import p2p_graph
    from .examples_subject import REAL_PHOTO_STAGES

    g = Graph(info, stages=REAL_PHOTO_STAGES + list(extra_stages))
    g.note(note, width=520)
    model, clip, vae = g.add("CheckpointLoaderSimple", 0, ckpt_name=CHECKPOINT)
    image, mask = g.add("LoadImage", 0, image=PHOTO_IMAGE)
    (latent,) = g.add("VAEEncode", 1, pixels=image, vae=vae)
    source, target = "a photo of a lake with a boat", "a photo of a lake with a swan"
    p = p2p_graph(g, source=source, target=target, mode="replace", blend_words=blend_words,
                  cross_replace_steps=0.8, self_replace_steps=self_replace_steps, start_blend=0.2,
                  model=model, clip=clip, vae=vae)
    (src,) = g.add("CLIPTextEncode", 1, title="Source prompt (for the inversion)", text=source, clip=clip)
    inv, noise, sigmas = g.add("EditLabDDIMInvert", 2, model=model, positive=src, latent=latent, steps=50)
    if mode == "null-text":
        (inv,) = g.add("EditLabNullTextOptimize", 2, model=model, inversion=inv, negative=p["negative"])
    decoded = edit_rows_from_inversion(g, model=p["model"], inv=inv, positive=p["positive"], negative=p["negative"],
                                       noise=noise, sigmas=sigmas, edit=p["edit"], latent=latent, vae=vae, mode=mode,
                                       prefix=prefix)
    if then is not None:
        then(g, {"image": image, "mask": mask, "decoded": decoded, "source": source, "target": target})
    return g.to_json()


def edit_rows_from_inversion(g: Graph, *, model, inv, positive, negative, noise, sigmas, edit, latent, vae,
                             mode: str, prefix: str) -> Out:
    """The end of every real-photo edit graph: the edit's rows from DDIM Invert's noise through the Inversion
    Guider (euler on the inversion's SIGMAS), decoded and saved, the source row's PSNR and the attention maps."""
    (rows,) = g.add("EditLabP2PLatentBatch", 3, latent=noise, edit=edit)
    (guider,) = g.add("EditLabInversionGuider", 3, model=model, inversion=inv, positive=positive,
                      negative=negative, mode=mode, cfg=7.5)
    (off,) = g.add("DisableNoise", 3)
    (sampler,) = g.add("KSamplerSelect", 3, sampler_name="euler")
    out, decoded = g.sample_decode(4, noise=off, guider=guider, sampler=sampler, sigmas=sigmas,
                                   latent=rows, vae=vae, prefix=prefix)
    g.add("EditLabReconstructionPSNR", 4, title="Source row PSNR", reconstruction_latent=out, original_latent=latent)
    (maps,) = g.add("EditLabAttentionMaps", 5, model=model, samples=out, tile_size=128)
    g.add("SaveImage", 5, images=maps, filename_prefix=prefix + "_maps")
    return decoded


def p2p_real_null_text_blend(info: dict) -> dict:
    return _p2p_real_photo(
        info, mode="null-text", prefix="editlab_p2p_real_null_text", blend_words="boat, swan",
        self_replace_steps=0.5,
        note="## Edit a real photo: null-text inversion + Prompt-to-Prompt + local blend\n\n"
             "Mokady et al. 2023 + Hertz et al. 2023. The photo is DDIM-inverted with its source prompt, the\n"
             "null embeddings are optimised, then [source, target] are sampled from the inverted noise with\n"
             "the attention controller: the target keeps the photo's layout, and **local blend** confines the\n"
             "change to where *boat* / *swan* attend. Output: the reconstruction, then the edit.\n\n"
             "* Describe the photo in the source prompt; change words in the target (same word count).\n"
             "* Settings: cross 0.8 / self 0.5, start_blend 0.2 (the null-text notebook).\n"
             "* Invert and optimise with the *plain* model; sample with the controlled one.")


def p2p_real_direct(info: dict) -> dict:
    return _p2p_real_photo(
        info, mode="direct", prefix="editlab_p2p_real_direct", blend_words="", self_replace_steps=0.6,
        note="## Edit a real photo: direct inversion + Prompt-to-Prompt\n\n"
             "Ju et al. 2024 (PnP Inversion): no optimisation at all. The source row is snapped back onto the\n"
             "inversion trajectory after every step, so it reconstructs the photo exactly, and the target\n"
             "row follows it through the attention controller. Seconds instead of a null-text optimisation.\n\n"
             "* The sampler must be euler / ddim on DDIM Invert's SIGMAS.\n"
             "* Add blend words to confine the edit (local blend).")


EXAMPLES.update({
    "Prompt-to-Prompt - real photo, null-text inversion + local blend": p2p_real_null_text_blend,
    "Prompt-to-Prompt - real photo, direct inversion": p2p_real_direct,
})
