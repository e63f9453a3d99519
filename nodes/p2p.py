"""Prompt-to-Prompt nodes (docs/methods.md §5; Hertz et al., ICLR 2023).

- ``EditLabPromptPairEncode``: CLIP + source + target prompt(s) -> CONDITIONING batch [source, target, ...]
  and an edit spec (``EDITLAB_P2P_EDIT``) with the word/token maps.
- ``EditLabP2PLatentBatch``: repeats a latent to the edit's rows with one shared noise draw.
- ``EditLabAttentionController``: MODEL + edit -> a clone whose attention is controlled (word swap,
  refine, reweight, self-attention replacement, local blend) under *any* sampler and guider.
- ``EditLabAttentionMaps``: IMAGE of the per-word cross-attention maps of the run that made a LATENT.

The maths lives in ``guidance/p2p.py`` / ``guidance/tokens.py`` (CLIP token helpers: ``clip_tokens.py``);
this module only wires it into ComfyUI: attention-replace patches on every transformer block (enumerated
from the UNet), which read the step from their own options (``sigmas``, ``sample_sigmas``), and two
ModelPatcher wrappers (``OUTER_SAMPLE``: check the batch and give each sampling run its own state;
``PREDICT_NOISE``: local blend on the guider's denoised prediction).
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

import comfy.ldm.modules.attention as comfy_attention
from comfy.patcher_extension import WrappersMP
from comfy_api.latest import io

from ..guidance.p2p import (
    ControlSettings,
    EditSpec,
    P2PController,
    P2PRun,
    Step,
    build_edit_spec,
    parse_word_values,
    step_of,
)
from .clip_tokens import encode_rows, plain_prompt_tokens, sd_tokenizer, word_tokenizer
from .common import CATEGORY, EditLabError, EditLabNode, latent_samples

P2P_CATEGORY = f"{CATEGORY}/Prompt-to-Prompt"
EDIT = io.Custom("EDITLAB_P2P_EDIT")
KEY = "editlab_p2p"  # wrapper key and transformer_options entry holding the controller


class PromptPairEncode(EditLabNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EditLabPromptPairEncode",
            display_name="Prompt Pair Encode (Prompt-to-Prompt)",
            category=P2P_CATEGORY,
            description="Encodes a source prompt and one or more edited target prompts as one CONDITIONING batch "
                        "[source, target, ...] (sample it with a latent batch of the same size) and aligns their "
                        "words for the Attention Controller (Hertz et al., Prompt-to-Prompt). replace = word "
                        "swap (same number of words); refine = words added or removed (global token alignment); "
                        "reweight = the source prompt again with some words strengthened/weakened.",
            inputs=[
                io.Clip.Input("clip", tooltip="The checkpoint's CLIP (SD1.x, SD2.x or SDXL)."),
                io.String.Input("source", multiline=True, default="a photo of a cat riding a bicycle",
                                tooltip="The prompt of the image to edit (plain text, at most 75 tokens)."),
                io.String.Input("target", multiline=True, default="a photo of a dog riding a bicycle",
                                tooltip="The edited prompt. Several targets: one per line (each becomes a row)."),
                io.Combo.Input("mode", options=["replace", "refine", "reweight"], default="replace",
                               tooltip="replace: word swap, the prompts have the same number of words. refine: "
                                       "words added/removed, tokens aligned globally. reweight: target = source "
                                       "with reweight_words scaled (reweight words also work on top of the others)."),
                io.String.Input("reweight_words", default="",
                                tooltip="Target words whose attention is scaled, comma-separated; 'word:factor' sets "
                                        "a factor per word (else reweight_factor). Negative values remove a concept."),
                io.Float.Input("reweight_factor", default=2.0, min=-10.0, max=10.0, step=0.1,
                               tooltip="Default factor for reweight words without their own (paper: 2 to 5; -2 to remove)."),
                io.String.Input("blend_words", default="",
                                tooltip="Local blend: comma-separated words (in any of the prompts) whose attention "
                                        "marks the region allowed to change, e.g. 'cat, dog'. Empty = no local blend."),
                io.String.Input("cross_replace_words", default="",
                                tooltip="Per-word cross-attention replacement, 'word:fraction' comma-separated (target "
                                        "words), overriding the controller's cross_replace_steps for those words."),
            ],
            outputs=[
                io.Conditioning.Output(display_name="conditioning",
                                       tooltip="[source, target, ...] as one batch: the positive of the guider."),
                EDIT.Output(display_name="edit", tooltip="Word/token maps for the Attention Controller."),
            ],
        )

    @classmethod
    def execute(cls, clip, source, target, mode, reweight_words, reweight_factor, blend_words,
                cross_replace_words) -> io.NodeOutput:
        if clip is None:
            raise EditLabError("no CLIP connected: connect the checkpoint loader's CLIP output")
        targets = [line.strip() for line in target.splitlines() if line.strip()]
        if not source.strip() or not targets:
            raise EditLabError("write a source prompt and at least one target prompt (one per line)")
        prompts = [" ".join(source.split())] + targets
        sd_tok = sd_tokenizer(clip)
        spec = build_edit_spec(
            prompts, mode, word_tokenizer(sd_tok), bos=int(sd_tok.start_token), eos=int(sd_tok.end_token),
            reweight=parse_word_values(reweight_words, reweight_factor, "reweight_words"),
            blend_words=[w.strip() for w in blend_words.split(",") if w.strip()],
            replace_overrides=parse_word_values(cross_replace_words, None, "cross_replace_words"),
        )
        rows = [plain_prompt_tokens(clip, sd_tok, prompt, words) for prompt, words in zip(prompts, spec.words)]
        return io.NodeOutput(encode_rows(clip, rows), spec)


class P2PLatentBatch(EditLabNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EditLabP2PLatentBatch",
            display_name="P2P Latent Batch (shared noise)",
            category=P2P_CATEGORY,
            description="Repeats the first latent of a batch once per prompt of the edit ([source, target, ...]) "
                        "and marks every row with the same batch index, so ComfyUI's RandomNoise gives all rows "
                        "the same starting noise — what prompt-to-prompt needs on generated images.",
            inputs=[
                io.Latent.Input("latent", tooltip="An Empty Latent Image (generated images) or an encoded image."),
                EDIT.Input("edit", tooltip="From Prompt Pair Encode: how many rows to make."),
            ],
            outputs=[io.Latent.Output(tooltip="rows = 1 + number of targets, one shared noise.")],
        )

    @classmethod
    def execute(cls, latent, edit) -> io.NodeOutput:
        samples = latent_samples(latent, "latent")
        rows = _spec(edit).rows
        out = {k: v for k, v in latent.items() if k not in ("samples", "batch_index", "noise_mask")}
        out["samples"] = samples[:1].repeat(rows, *([1] * (samples.ndim - 1)))
        index = latent.get("batch_index", [0])[0]
        out["batch_index"] = [int(index)] * rows
        if "noise_mask" in latent:
            mask = latent["noise_mask"]
            out["noise_mask"] = mask[:1].repeat(rows, *([1] * (mask.ndim - 1))) if mask.ndim >= 3 else mask
        return io.NodeOutput(out)


def _spec(edit) -> EditSpec:
    if not isinstance(edit, EditSpec):
        raise EditLabError("'edit' must come from Prompt Pair Encode")
    return edit


# -- the controller on the model ------------------------------------------------------------------

def unet_attention_blocks(diffusion_model) -> list[tuple[str, int, int, int]]:
    """(block name, number, transformer index, downsample factor) of every transformer block of a UNet,
    in ComfyUI's patch keys; the factor says at which resolution the block attends."""
    blocks: list[tuple[str, int, int, int]] = []

    def visit(name: str, number: int, module, factor: int) -> int:
        for layer in module:
            kind = type(layer).__name__
            if kind == "Downsample":
                factor *= 2
            elif kind == "Upsample":
                factor = max(1, factor // 2)
            elif hasattr(layer, "transformer_blocks"):
                for i, blk in enumerate(layer.transformer_blocks):
                    if getattr(blk, "attn2", None) is not None:
                        blocks.append((name, number, i, factor))
        return factor

    if not all(hasattr(diffusion_model, a) for a in ("input_blocks", "output_blocks")):
        return blocks
    factor = 1
    for i, module in enumerate(diffusion_model.input_blocks):
        factor = visit("input", i, module, factor)
    if getattr(diffusion_model, "middle_block", None) is not None:
        visit("middle", 0, diffusion_model.middle_block, factor)
    for i, module in enumerate(diffusion_model.output_blocks):
        factor = visit("output", i, module, factor)
    return blocks


def _kernel(prev: Optional[Callable], extra: dict) -> Callable:
    """The attention used for every (possibly modified) call: an earlier replace patch on this block
    if there is one (patches stack), else ComfyUI's optimised kernel."""
    if prev is not None:
        return lambda q, k, v, heads: prev(q, k, v, extra)
    precision = extra.get("attn_precision")
    return lambda q, k, v, heads: comfy_attention.optimized_attention(
        q, k, v, heads, attn_precision=precision, transformer_options=extra)


class StepClock:
    """The sampler step of a forward pass, read from an attention call's own options: ``sigmas`` (this
    forward's sigma) and ``sample_sigmas`` (the whole schedule), which ComfyUI puts in every forward's
    transformer_options. The ~30 attention calls of one forward share one read: the schedule is copied to
    the host once per schedule tensor and the sigma once per forward (both by tensor identity)."""

    def __init__(self):
        self._schedule: tuple = (None, [])
        self._last: tuple = (None, None, None)

    def schedule(self, sample_sigmas: torch.Tensor) -> list[float]:
        if self._schedule[0] is not sample_sigmas:
            self._schedule = (sample_sigmas, sample_sigmas.detach().float().cpu().reshape(-1).tolist())
        return self._schedule[1]

    def __call__(self, options: dict) -> Step:
        sigmas, sample_sigmas = options.get("sigmas"), options.get("sample_sigmas")
        if sigmas is None or sample_sigmas is None:
            raise EditLabError("prompt-to-prompt reads the step from the sampler's schedule, and this model call "
                               "has none: sample the controlled MODEL with a ComfyUI sampler (KSampler, "
                               "SamplerCustom, SamplerCustomAdvanced)")
        if self._last[0] is not sigmas or self._last[1] is not sample_sigmas:
            self._last = (sigmas, sample_sigmas, step_of(float(sigmas.reshape(-1)[0]), self.schedule(sample_sigmas)))
        return self._last[2]


def run_key(controller: P2PController) -> str:
    """The transformer_options entry holding a controller's current run (one per controller: they stack)."""
    return f"{KEY}_run_{id(controller):x}"


def _cross_patch(controller: P2PController, clock: StepClock, prev: Optional[Callable]):
    key = run_key(controller)

    def attn2(q, k, v, extra):
        return controller.cross(q, k, v, extra["n_heads"], extra.get("cond_or_uncond", [0]), clock(extra),
                                _kernel(prev, extra), extra.get(key))
    return attn2


def _self_patch(controller: P2PController, clock: StepClock, prev: Optional[Callable]):
    def attn1(q, k, v, extra):
        return controller.self_attention(q, k, v, extra["n_heads"], extra.get("cond_or_uncond", [0]), clock(extra),
                                         _kernel(prev, extra))
    return attn1


def _outer_sample_wrapper(controller: P2PController):
    """Check the batch, and give this sampling run its own state: a :class:`P2PRun` placed in the run's
    own copy of the model options (the guider's, cloned per run by ComfyUI), so every attention call and
    the blend of this run - and only of this run - see it. The run's maps are recorded under its output."""
    key = run_key(controller)

    def wrapper(executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
        rows = controller.spec.rows
        guider = executor.class_obj
        for entry in (getattr(guider, "conds", None) or {}).get("positive", []) or []:
            cross = entry.get("cross_attn") if isinstance(entry, dict) else None
            if isinstance(cross, torch.Tensor) and cross.shape[0] != rows:
                raise EditLabError(
                    f"the positive conditioning has a batch of {cross.shape[0]} but the edit has {rows} prompts "
                    "(source + targets): connect the 'conditioning' output of Prompt Pair Encode as the positive"
                )
        run = controller.new_run(int(noise.shape[0]), tuple(noise.shape[-2:]))
        if noise.shape[0] > 1:
            same_noise = all(torch.equal(noise[0], noise[i]) for i in range(1, noise.shape[0]))
            same_start = latent_image is None or all(torch.equal(latent_image[0], latent_image[i])
                                                     for i in range(1, latent_image.shape[0]))
            if not (same_noise and same_start):
                raise EditLabError(
                    "prompt-to-prompt rows must start from the same latent, but the sampler's rows differ (noise "
                    "or latent); pass the latent through 'EditLab P2P Latent Batch' (one shared noise draw), or "
                    "start every row from the same inverted latent"
                )
        options = guider.model_options
        # A new dict, not an edit of the guider's: the run is seen by this run only.
        guider.model_options = {**options, "transformer_options": {**options.get("transformer_options", {}), key: run}}
        try:
            out = executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
        finally:
            guider.model_options = options
        controller.finish(run, out)
        return out
    return wrapper


def _predict_noise_wrapper(controller: P2PController, clock: StepClock):
    """Local blend on the guider's final (CFG-combined) denoised prediction of all rows of the run."""
    key = run_key(controller)

    def wrapper(executor, x, timestep, model_options={}, seed=None, *args, **kwargs):
        denoised = executor(x, timestep, model_options, seed, *args, **kwargs)
        options = (model_options or {}).get("transformer_options", {})
        run: Optional[P2PRun] = options.get(key)
        if run is None or options.get("sample_sigmas") is None:
            return denoised
        return controller.blend(run, x, denoised, float(timestep.reshape(-1)[0]),
                                clock.schedule(options["sample_sigmas"]))
    return wrapper


def refuse_joint_attention(model) -> None:
    """Refuse a DiT with joint text-image attention (SD3 MMDiT, Flux), naming it (docs/methods.md §5, §11).

    Prompt-to-Prompt edits a separate cross-attention map ``softmax(q_img k_txt^T)`` per token. In SD3's MMDiT
    and Flux's double/single blocks text and image tokens attend jointly in one softmax over
    ``[text; image]`` keys, through ComfyUI's ``patches_replace["dit"]`` block hooks that see whole blocks,
    not the attention probabilities; the UNet ``attn1`` / ``attn2`` hooks the controller uses are never called
    there, so it would sample without any edit control. Refused before any work, with the reason.
    """
    net = model.get_model_object("diffusion_model")
    labels = {"OpenAISignatureMMDITWrapper": "SD3 (MMDiT)", "MMDiT": "MMDiT", "Flux": "Flux"}
    kind = next((labels[c.__name__] for c in type(net).__mro__ if c.__name__ in labels), None)
    if kind is None and not (hasattr(net, "joint_blocks") or hasattr(net, "double_blocks")):
        return
    raise EditLabError(
        f"the Attention Controller (Prompt-to-Prompt) does not support {kind or type(net).__name__} models "
        f"({type(model.model).__name__}): their text and image tokens share one joint attention, so there is no "
        "separate cross-attention map per word to swap, refine or reweight (ComfyUI's UNet attn1/attn2 patches "
        "are never called on this network and the edit would silently do nothing). Use an SD1.x / SD2.x / SDXL "
        "model for Prompt-to-Prompt, or edit this model with the Inversion Guider or SDEdit nodes")


def controlled_model(model, spec: EditSpec, settings: ControlSettings):
    """A clone of ``model`` carrying the controller (attention patches + wrappers); the input is untouched."""
    refuse_joint_attention(model)
    m = model.clone()
    blocks = unet_attention_blocks(m.get_model_object("diffusion_model"))
    if not blocks:
        raise EditLabError(
            f"the Attention Controller patches the cross-attention of UNet models (SD1.x, SD2.x, SDXL); this "
            f"model ({type(model.model).__name__}, network {type(m.get_model_object('diffusion_model')).__name__}) "
            "has no UNet transformer blocks with cross-attention"
        )
    controller = P2PController(spec, settings, levels=[b[3] for b in blocks])
    clock = StepClock()
    replace = m.model_options.get("transformer_options", {}).get("patches_replace", {})
    prev1, prev2 = replace.get("attn1", {}), replace.get("attn2", {})
    for name, number, index, _ in blocks:
        m.set_model_attn2_replace(_cross_patch(controller, clock, prev2.get((name, number, index), prev2.get((name, number)))),
                                  name, number, index)
        if settings.self_replace > 0:
            m.set_model_attn1_replace(_self_patch(controller, clock, prev1.get((name, number, index), prev1.get((name, number)))),
                                      name, number, index)
    m.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, KEY, _outer_sample_wrapper(controller))
    if spec.has_blend:
        m.add_wrapper_with_key(WrappersMP.PREDICT_NOISE, KEY, _predict_noise_wrapper(controller, clock))
    m.model_options["transformer_options"] = {**m.model_options.get("transformer_options", {}), KEY: controller}
    return m


class AttentionController(EditLabNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EditLabAttentionController",
            display_name="Attention Controller (Prompt-to-Prompt)",
            category=P2P_CATEGORY,
            description="Prompt-to-Prompt (Hertz et al.) as a MODEL patch: while sampling the [source, target, ...] "
                        "batch of Prompt Pair Encode, the targets' cross-attention maps are derived from the "
                        "source's (word swap / refine / reweight) and their small-resolution self-attention is "
                        "replaced, so the edit keeps the source's layout. Works with any sampler and guider; only "
                        "the conditional target rows are edited. With blend words, the edit is confined to where "
                        "they attend (local blend): exact for euler/ddim; ancestral and SDE samplers follow the "
                        "source outside the region up to the fresh noise of each step, and land on it exactly at "
                        "the last step.",
            inputs=[
                io.Model.Input("model", tooltip="The model to patch; the output is a patched clone (this input is left unchanged)."),
                EDIT.Input("edit", tooltip="From Prompt Pair Encode."),
                io.Float.Input("cross_replace_steps", default=0.8, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the steps during which target cross-attention comes from the "
                                       "source (paper: 0.8 word swap, 0.4 refine in PIE-Bench). Lower = bigger edits."),
                io.Float.Input("self_replace_steps", default=0.4, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the steps during which target self-attention is the source's "
                                       "(paper: 0.4 generated, 0.5-0.6 real images). Higher = closer structure."),
                io.Int.Input("self_attention_max_size", default=16, min=1, max=256,
                             tooltip="Self-attention is replaced only at layers of at most this many latent "
                                     "pixels per side (16 at 512 px as in the paper; 32 in the null-text notebook; "
                                     "use 32 for SDXL at 1024 px)."),
                io.Int.Input("map_size", default=16, min=1, max=256,
                             tooltip="Side of the attention maps used for local blend and Attention Maps: the "
                                     "model's attention resolution nearest to it is used (16 at 512 px = paper)."),
                io.Float.Input("blend_threshold", default=0.3, min=0.0, max=1.0, step=0.01,
                               tooltip="Local blend: a pixel may change where the blend words' normalised attention "
                                       "exceeds this (paper 0.3)."),
                io.Float.Input("start_blend", default=0.2, min=0.0, max=1.0, step=0.01,
                               tooltip="Local blend starts after this fraction of the steps (0.2 in the null-text "
                                       "notebook; 0 = from the first step as in the original notebook)."),
            ],
            outputs=[io.Model.Output(tooltip="A patched clone; sample the Prompt Pair Encode batch with it.")],
        )

    @classmethod
    def execute(cls, model, edit, cross_replace_steps, self_replace_steps, self_attention_max_size, map_size,
                blend_threshold, start_blend) -> io.NodeOutput:
        settings = ControlSettings(cross_replace=float(cross_replace_steps), self_replace=float(self_replace_steps),
                                   self_max_tokens=int(self_attention_max_size) ** 2, map_size=int(map_size),
                                   blend_threshold=float(blend_threshold), start_blend=float(start_blend))
        return io.NodeOutput(controlled_model(model, _spec(edit), settings))


# -- attention maps -------------------------------------------------------------------------------

def _label_strip(text: str, width: int, height: int) -> np.ndarray:
    from PIL import Image, ImageDraw
    im = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(im)
    label = text if len(text) <= max(3, width // 7) else text[: max(2, width // 7 - 1)] + "…"
    box = draw.textbbox((0, 0), label)
    draw.text(((width - (box[2] - box[0])) // 2, (height - (box[3] - box[1])) // 2 - box[1]), label, fill=(255, 255, 255))
    return np.asarray(im, dtype=np.float32) / 255.0


def attention_map_grid(maps: torch.Tensor, grid: tuple[int, int], spec: EditSpec, tile: int, per_row: int = 8) -> torch.Tensor:
    """IMAGE [rows, H, W, 3]: for every prompt, one tile per word (its tokens' maps summed, normalised by
    the tile's maximum) with the word written under it."""
    label_h = 18
    images = []
    n_tiles = max(len(spec.labels(r)) for r in range(spec.rows))
    cols = min(per_row, n_tiles)
    lines = -(-n_tiles // cols)
    gh, gw = grid
    tile_w = max(8, int(round(tile * gw / max(gh, gw))))
    tile_h = max(8, int(round(tile * gh / max(gh, gw))))
    for r in range(spec.rows):
        canvas = np.zeros((lines * (tile_h + label_h), cols * tile_w, 3), np.float32)
        for n, (word, positions) in enumerate(spec.labels(r)):
            m = maps[r][:, positions].sum(-1).reshape(1, 1, gh, gw).float()
            m = F.interpolate(m, size=(tile_h, tile_w), mode="bilinear", align_corners=False)[0, 0]
            m = (m / m.max().clamp_min(1e-12)).clamp(0, 1).numpy()
            y, x = (n // cols) * (tile_h + label_h), (n % cols) * tile_w
            canvas[y:y + tile_h, x:x + tile_w] = m[:, :, None]
            canvas[y + tile_h:y + tile_h + label_h, x:x + tile_w] = _label_strip(word, tile_w, label_h)
        images.append(torch.from_numpy(canvas))
    return torch.stack(images)


class AttentionMaps(EditLabNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EditLabAttentionMaps",
            display_name="Attention Maps (Prompt-to-Prompt)",
            category=P2P_CATEGORY,
            description="Shows what each word attends to: the per-word cross-attention maps of the sampling run "
                        "that produced 'samples' with a controlled MODEL, averaged over heads, layers and steps at the controller's map_size, "
                        "one image per prompt (source first), each tile labelled with its word. Use it to choose "
                        "blend and reweight words.",
            inputs=[
                io.Model.Input("model", tooltip="The MODEL output of the Attention Controller that was sampled."),
                io.Latent.Input("samples", tooltip="The sampler's output LATENT: the maps shown are those of the run that "
                                                "produced it (and connecting it runs this node after sampling)."),
                io.Int.Input("tile_size", default=128, min=16, max=1024, step=8, tooltip="Size of each word's tile in pixels."),
            ],
            outputs=[io.Image.Output(tooltip="One image per prompt: a grid of word tiles (bright = strong attention).")],
        )

    @classmethod
    def execute(cls, model, samples, tile_size) -> io.NodeOutput:
        controller = model.model_options.get("transformer_options", {}).get(KEY)
        if not isinstance(controller, P2PController):
            raise EditLabError("this MODEL carries no attention controller: connect the MODEL output of "
                               "'EditLab Attention Controller' (the one the sampler used)")
        # The maps belong to the run that produced this LATENT (found by its exact values), so two samplers
        # fed by one controlled MODEL each show their own maps, whichever ran last.
        record = controller.maps_for(latent_samples(samples, "samples"))
        if record is None:
            raise EditLabError(
                "these samples were not produced by a sampling run of this controlled MODEL (or by one of its "
                f"last {P2PController.RECORDS} runs): connect the sampler's output LATENT (KSampler 'LATENT', "
                "SamplerCustomAdvanced 'output', not 'denoised_output') to 'samples', and the MODEL that sampler "
                "used to 'model'"
            )
        return io.NodeOutput(attention_map_grid(record.maps, record.grid, controller.spec, int(tile_size)))


NODES = [PromptPairEncode, P2PLatentBatch, AttentionController, AttentionMaps]
