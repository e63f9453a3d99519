"""Prompt-to-Prompt example workflows (docs/methods.md §5), as code; see builder.py and examples.py.

``p2p_graph`` builds the shared part (prompt pair -> controller -> guider) so the real-image workflows
(inversion guider instead of CFGGuider, inverted latent instead of the empty one) only swap the ends.
"""
from __future__ import annotations

from typing import Callable, Optional

from .builder import Graph, Out

CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
NEGATIVE = ""  # the paper samples with the empty prompt as the unconditional one
STAGES = ["load", "encode prompts", "Prompt-to-Prompt control", "sample", "decode and save", "attention maps"]


def p2p_graph(g: Graph, *, source: str, target: str, mode: str = "replace", reweight_words: str = "",
              reweight_factor: float = 2.0, blend_words: str = "", cross_replace_words: str = "",
              cross_replace_steps: float = 0.8, self_replace_steps: float = 0.4, start_blend: float = 0.2,
              model: Optional[Out] = None, clip: Optional[Out] = None, vae: Optional[Out] = None) -> dict:
    """Checkpoint (unless given) + Prompt Pair Encode + Attention Controller + empty negative prompt.

    Returns the sockets a workflow continues from: ``model`` (controlled), ``base_model`` (plain, for
    inversion nodes), ``clip``, ``vae``, ``positive`` (the [source, target, ...] batch), ``negative``, ``edit``.
    """
    if model is None:
        model, clip, vae = g.add("CheckpointLoaderSimple", 0, ckpt_name=CHECKPOINT)
    positive, edit = g.add("EditLabPromptPairEncode", 1, clip=clip, source=source, target=target, mode=mode,
                           reweight_words=reweight_words, reweight_factor=reweight_factor, blend_words=blend_words,
                           cross_replace_words=cross_replace_words)
    (negative,) = g.add("CLIPTextEncode", 1, title="Negative prompt (empty = the paper's)", text=NEGATIVE, clip=clip)
    (controlled,) = g.add("EditLabAttentionController", 2, model=model, edit=edit,
                          cross_replace_steps=cross_replace_steps, self_replace_steps=self_replace_steps,
                          start_blend=start_blend)
    return {"model": controlled, "base_model": model, "clip": clip, "vae": vae, "positive": positive,
            "negative": negative, "edit": edit}


def generate(g: Graph, p: dict, *, prefix: str, steps: int = 50, cfg: float = 7.5, seed: int = 8888,
             size: int = 512) -> Out:
    """Sample the edit batch from one shared noise (generated images), decode and save; returns the LATENT."""
    (empty,) = g.add("EmptyLatentImage", 0, width=size, height=size, batch_size=1)
    (latent,) = g.add("EditLabP2PLatentBatch", 2, latent=empty, edit=p["edit"])
    (out,) = g.add("KSampler", 3, model=p["model"], seed=seed, steps=steps, cfg=cfg, sampler_name="ddim",
                   scheduler="ddim_uniform", positive=p["positive"], negative=p["negative"], latent_image=latent,
                   denoise=1.0)
    (decoded,) = g.add("VAEDecode", 4, samples=out, vae=p["vae"])
    g.add("SaveImage", 4, images=decoded, filename_prefix=prefix)
    return out


def p2p_word_swap(info: dict) -> dict:
    g = Graph(info, stages=STAGES)
    g.note(
        "## Prompt-to-Prompt: word swap on a generated image\n\n"
        "Hertz et al., *Prompt-to-Prompt Image Editing with Cross-Attention Control*, ICLR 2023.\n"
        "The source and the target prompt are sampled together from the **same noise**; while\n"
        "sampling, the target's attention maps are taken from the source's, so only the swapped\n"
        "word's content changes. Output: the source image, then the edit.\n\n"
        "* **target**: same number of words as the source (one target per line for several edits).\n"
        "* **cross_replace_steps** 0.8 / **self_replace_steps** 0.4: the paper's word-swap settings;\n"
        "  lower them for bigger changes (e.g. a different shape).\n"
        "* **blend_words** `cat, dog`: local blend, only the animal may change; clear it to edit globally.\n"
        "* Any sampler works; with local blend, deterministic samplers (ddim, euler) keep the outside\n"
        "  exactly like the source at every step.",
        width=460)
    p = p2p_graph(g, source="a photo of a cat riding a bicycle", target="a photo of a dog riding a bicycle",
                  blend_words="cat, dog", start_blend=0.0)
    generate(g, p, prefix="editlab_p2p_word_swap")
    return g.to_json()


def p2p_refine_reweight(info: dict) -> dict:
    g = Graph(info, stages=STAGES)
    g.note(
        "## Prompt-to-Prompt: refine + reweight\n\n"
        "**refine** adds words to the prompt: tokens are aligned globally and the new words attend\n"
        "freely while the others keep the source's maps. **reweight_words** scale a word's attention\n"
        "(here `snowy:3`: more snow); a negative factor removes a concept.\n\n"
        "* PIE-Bench settings for refine: cross 0.4 / self 0.6; the notebook uses 0.8 / 0.4.\n"
        "* **cross_replace_words** (`word:fraction`) lets one word follow the source for longer or shorter.",
        width=460)
    p = p2p_graph(g, source="a house on a mountain", target="a house on a snowy mountain at sunset", mode="refine",
                  reweight_words="snowy:3", cross_replace_steps=0.8, self_replace_steps=0.4)
    generate(g, p, prefix="editlab_p2p_refine_reweight")
    return g.to_json()


def p2p_attention_maps(info: dict) -> dict:
    g = Graph(info, stages=STAGES)
    g.note(
        "## Prompt-to-Prompt: what does each word control?\n\n"
        "The Attention Maps node shows the cross-attention of every word of the source (first image)\n"
        "and the target (second), averaged over heads, layers and steps at the controller's map_size\n"
        "(16x16 at 512 px). Bright = the word attends there. Use it to pick **blend_words** (a word\n"
        "whose map covers the object) and **reweight_words**.",
        width=460)
    p = p2p_graph(g, source="a photo of a cat riding a bicycle", target="a photo of a dog riding a bicycle")
    out = generate(g, p, prefix="editlab_p2p_maps_result")
    (maps,) = g.add("EditLabAttentionMaps", 5, model=p["model"], samples=out, tile_size=128)
    g.add("SaveImage", 5, images=maps, filename_prefix="editlab_p2p_attention_maps")
    return g.to_json()


EXAMPLES: dict[str, Callable[[dict], dict]] = {
    "Prompt-to-Prompt - word swap (generated image)": p2p_word_swap,
    "Prompt-to-Prompt - refine + reweight (generated image)": p2p_refine_reweight,
    "Prompt-to-Prompt - attention maps per word": p2p_attention_maps,
}
