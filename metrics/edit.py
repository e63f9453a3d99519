"""The PIE-Bench edit set and the DreamBench subject set, row by row (docs/methods.md §9).

``edit_metrics``: source + edited (+ edit mask) (+ target prompt) -> structure distance (whole image),
background PSNR / LPIPS / MSE / SSIM (outside the edit mask; the whole image when there is no mask), CLIP
similarity of the whole edited image and of its edited region (edited * mask) to the target prompt.

Default: crop-free region metrics that do not count zeroed pixels, CLIP as a cosine, DINO on [0,1] images.
``compat=True`` reproduces the PIE-Bench evaluation (Ju et al., ``evaluation/evaluate.py``) exactly as
written: 8-bit images, the mask's one-pixel border forced to 1, images multiplied by the background and the
metrics taken over every pixel (zeros counted), LPIPS on SqueezeNet (the caller loads that net), DINO fed
0-255 values, CLIP as torchmetrics' CLIPScore ``max(100 cos, 0)`` through the Hugging Face processor on the
8-bit masked image; an empty region gives NaN, as the reference's "nan".
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import EditLabError
from . import embed, pixel
from .models import ClipModel, FeatureModel, VitModel
from .names import EDIT_KEYS, GUIDE_KEYS, SUBJECT_KEYS



@dataclass
class EditModels:
    clip: ClipModel | None = None
    structure: VitModel | None = None
    lpips: FeatureModel | None = None


def _need(model: Any, what: str, metric: str) -> Any:
    if model is None:
        raise EditLabError(f"{metric} needs the {what} model; load it (or leave {metric} out)")
    return model


def _prompts(prompts: str | Sequence[str] | None, n: int, what: str) -> list[str] | None:
    if prompts is None:
        return None
    items = [prompts] if isinstance(prompts, str) else list(prompts)
    if len(items) == 1:
        items = items * n
    if len(items) != n:
        raise EditLabError(f"{what}: {len(items)} prompts for {n} images (give one, or one per image)")
    return [p.replace("[", "").replace("]", "") for p in items]  # PIE-Bench marks edited words with [ ]


def pie_clip_score(clip: ClipModel, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
    """torchmetrics' CLIPScore per image, as PIE-Bench calls it: max(100 cos, 0), HF processor on 8-bit images."""
    from transformers import CLIPImageProcessor
    processor = CLIPImageProcessor.from_pretrained(clip.path, local_files_only=True) if _has_processor(clip) \
        else CLIPImageProcessor(**{k: v for k, v in clip.image_cfg.items() if not k.startswith("_")})
    u8 = [(i * 255).round().to(torch.uint8) for i in images]  # np.uint8(img * mask): values are already whole
    px = processor(images=[t.cpu() for t in u8], return_tensors="pt")["pixel_values"]
    dev = next(clip.model.parameters()).device
    with torch.inference_mode():
        img = torch.nn.functional.normalize(clip.image_features(px.to(dev)).float().cpu(), dim=-1)
    txt = embed.clip_text_embeds(clip, texts)
    return (100 * (img * txt).sum(-1)).clamp_min(0)


def _has_processor(clip: ClipModel) -> bool:
    import os
    return os.path.isfile(os.path.join(clip.path, "preprocessor_config.json"))


def edit_metrics(source: torch.Tensor, edited: torch.Tensor, mask: torch.Tensor | None, prompts: Any,
                 models: EditModels, compat: bool = False, keys: Sequence[str] = EDIT_KEYS) -> list[dict]:
    """Row-by-row PIE-Bench metrics of edited vs source images ([B,H,W,C] in [0,1]); one dict per row.

    ``mask`` [B,H,W] marks the edit (1 = edited); background metrics use 1 - mask. ``prompts`` (the target
    prompt) is needed for the CLIP metrics only.
    """
    unknown = [k for k in keys if k not in EDIT_KEYS + GUIDE_KEYS]
    if unknown:
        raise EditLabError(f"unknown edit metrics {unknown}; choose from {list(EDIT_KEYS + GUIDE_KEYS)}")
    src, out = pixel.as_bchw(source, "source image"), pixel.as_bchw(edited, "edited image")
    pixel.same_size(src, out, "source / edited")
    src, out = pixel.pair(src, out)
    n = src.shape[0]
    edit = pixel.as_region(mask, src, "edit mask")
    if compat:
        src, out = pixel.quantize(src), pixel.quantize(out)
        if edit is None:  # the reference always has a mask; with none, the whole image is the edit region
            edit = torch.zeros(n, 1, *src.shape[-2:])
        edit = pixel.pie_region(edit.round())
    background = None if edit is None else 1 - edit
    res: dict[str, torch.Tensor] = {}
    if any(k in keys for k in ("psnr", "mse", "ssim", "lpips")):
        lp = _need(models.lpips, "LPIPS", "lpips").module if "lpips" in keys else None
        if compat:
            res.update(pixel.pie_pixel(src, out, background, lp))
        else:
            res["psnr"], res["mse"], res["ssim"] = (pixel.psnr(src, out, background), pixel.mse(src, out, background),
                                                    pixel.ssim(src, out, background))
            if lp is not None:
                res["lpips"] = pixel.lpips(lp, src, out, background)
    if "l2" in keys:  # SDEdit: the L2 distance of the whole output to its guide
        res["l2"] = pixel.l2(src, out)
    if "structure_distance" in keys:
        vit = _need(models.structure, "structure (DINO ViT-B/8)", "structure_distance")
        res["structure_distance"] = embed.structure_distance(vit, src, out, compat)
    if "clip_whole" in keys or "clip_edited" in keys:
        clip = _need(models.clip, "CLIP", "clip_whole / clip_edited")
        texts = _prompts(prompts, n, "target prompt")
        if texts is None:
            raise EditLabError("the CLIP metrics need the target prompt; give it (or leave clip_whole / clip_edited out)")
        region = out * edit if edit is not None else out
        if compat:
            res["clip_whole"] = pie_clip_score(clip, out, texts)
            res["clip_edited"] = pie_clip_score(clip, region, texts)
        else:
            t = embed.clip_text_embeds(clip, texts)
            res["clip_whole"] = embed.clip_t(embed.clip_image_embeds(clip, out), t)
            res["clip_edited"] = embed.clip_t(embed.clip_image_embeds(clip, region), t)
        if edit is not None:  # no edited region: NaN, as the reference's "nan"
            empty = edit.flatten(1).sum(1) == 0
            res["clip_edited"] = torch.where(empty, torch.full_like(res["clip_edited"], math.nan), res["clip_edited"])
    return [{k: float(res[k][i]) for k in keys if k in res} for i in range(n)]


def reference_embeds(references: torch.Tensor, clip: ClipModel | None, dino: VitModel | None,
                     keys: Sequence[str] = SUBJECT_KEYS) -> dict[str, torch.Tensor]:
    """The reference images' unit embeddings the subject metrics compare against: ``{"dino": .., "clip": ..}``
    (only those ``keys`` need). Computed once per subject, they serve every image generated of it."""
    ref = pixel.as_bchw(references, "reference images")
    out: dict[str, torch.Tensor] = {}
    if "dino" in keys:
        out["dino"] = embed.dino_embeds(_need(dino, "DINO (ViT-S/16)", "dino"), ref)
    if "clip_i" in keys:
        out["clip"] = embed.clip_image_embeds(_need(clip, "CLIP", "clip_i / clip_t"), ref)
    return out


def subject_metrics(generated: torch.Tensor, references: torch.Tensor | dict, prompts: Any, clip: ClipModel | None,
                    dino: VitModel | None, keys: Sequence[str] = SUBJECT_KEYS) -> list[dict]:
    """DreamBooth's DINO / CLIP-I (mean cosine to every reference image) and CLIP-T, per generated image.
    ``references``: the reference images, or their ``reference_embeds`` (a scorer reuses them per subject)."""
    gen = pixel.as_bchw(generated, "generated images")
    ref = references if isinstance(references, dict) else reference_embeds(references, clip, dino, keys)
    res: dict[str, torch.Tensor] = {}
    if "dino" in keys:
        vit = _need(dino, "DINO (ViT-S/16)", "dino")
        res["dino"] = embed.mean_pairwise_cos(embed.dino_embeds(vit, gen), ref["dino"])
    if "clip_i" in keys or "clip_t" in keys:
        c = _need(clip, "CLIP", "clip_i / clip_t")
        g = embed.clip_image_embeds(c, gen)
        if "clip_i" in keys:
            res["clip_i"] = embed.mean_pairwise_cos(g, ref["clip"])
        if "clip_t" in keys:
            texts = _prompts(prompts, gen.shape[0], "prompt")
            if texts is None:
                raise EditLabError("CLIP-T needs the prompt the images were generated from")
            res["clip_t"] = embed.clip_t(g, embed.clip_text_embeds(c, texts))
    return [{k: float(res[k][i]) for k in keys if k in res} for i in range(gen.shape[0])]


def summarize(rows: list[dict]) -> dict:
    """Mean of each metric over rows, NaN left out (the reference's "nan" rows); an inf PSNR makes the mean inf."""
    out = {}
    for key in {k for r in rows for k in r}:
        vals = np.array([r[key] for r in rows if key in r and isinstance(r[key], (int, float))], dtype=float)
        vals = vals[~np.isnan(vals)]
        out[key] = float(vals.mean()) if vals.size else math.nan
    return out

