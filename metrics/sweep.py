"""One metric per image of a sweep (docs/methods.md §9): the curves of SDEdit's t0 trade-off and similar plots.

A sweep is a batch of images, one per setting (t0, a guidance scale, a step count...). Each image is scored
against a reference (the guide / source image) or a text, so the settings can be plotted against each other:
SDEdit's faithfulness is the L2 distance to the guide and its realism/text fit CLIP-T, over t0 (Meng et al.).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import EditLabError
from . import embed, pixel

# metric -> (needs a reference image, needs a text, higher is better)
SWEEP_METRICS = {
    "l2": (True, False, False),
    "mse": (True, False, False),
    "psnr": (True, False, True),
    "ssim": (True, False, True),
    "lpips": (True, False, False),
    "clip_t": (False, True, True),
    "clip_i": (True, False, True),
    "dino": (True, False, True),
}


@dataclass
class SweepModels:
    """What a metric needs, loaded by the caller: a ClipModel (clip_t / clip_i), a VitModel (dino), an LPIPS net."""
    clip: Any = None
    dino: Any = None
    lpips: Any = None


def sweep_values(metric: str, images: torch.Tensor, reference: torch.Tensor | None, text: str,
                 models: SweepModels) -> torch.Tensor:
    """``metric`` of every image ([B,H,W,C] in [0,1]) against ``reference`` (one image, or one per row) or ``text``; [B]."""
    if metric not in SWEEP_METRICS:
        raise EditLabError(f"sweep metric {metric!r} is not one of {list(SWEEP_METRICS)}")
    needs_ref, needs_text, _ = SWEEP_METRICS[metric]
    out = pixel.as_bchw(images, "images")
    if needs_text:
        if not text.strip():
            raise EditLabError(f"the {metric} sweep metric scores images against a text: give the text (the prompt)")
        return embed.clip_t(embed.clip_image_embeds(models.clip, out), embed.clip_text_embeds(models.clip, [text]))
    if reference is None:
        raise EditLabError(f"the {metric} sweep metric compares every image with a reference: connect the reference "
                           "image (the guide / source)")
    ref = pixel.as_bchw(reference, "reference")
    if ref.shape[0] not in (1, out.shape[0]):
        raise EditLabError(f"{ref.shape[0]} reference images for {out.shape[0]} sweep images; give one reference "
                           "(or one per image)")
    if metric in ("clip_i", "dino"):
        emb = embed.clip_image_embeds if metric == "clip_i" else embed.dino_embeds
        model = models.clip if metric == "clip_i" else models.dino
        a, b = pixel.pair(emb(model, ref), emb(model, out))
        return (a * b).sum(-1)
    pixel.same_size(ref, out, "reference / sweep images")
    ref, out = pixel.pair(ref, out)
    if metric == "lpips":
        return pixel.lpips(models.lpips.module, ref, out)
    return {"l2": pixel.l2, "mse": pixel.mse, "psnr": pixel.psnr, "ssim": pixel.ssim}[metric](ref, out)
