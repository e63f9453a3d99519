"""Embedding metrics (docs/methods.md §9): CLIP-T, CLIP-I, CLIP directional similarity, DINO, structure distance.

- CLIP-T: cos(E_I(image), E_T(prompt)); CLIP-I: mean cos of CLIP image embeddings, generated vs references;
  DINO: the same with DINO ViT-S/16 CLS embeddings (DreamBooth, Ruiz et al. 2023).
- Directional CLIP similarity (InstructPix2Pix, Brooks et al. 2023; StyleGAN-NADA):
  cos(E_I(out) - E_I(in), E_T(caption_after) - E_T(caption_before)).
- Structure distance (PIE-Bench, Ju et al.; Tumanyan et al.'s "Splicing ViT Features"): the MSE between the
  cosine self-similarity matrices of the last-layer keys (all heads concatenated, CLS included) of DINO ViT-B/8.

Images are [B,3,H,W] in [0,1]; preprocessing runs in torch (batched, no PIL): resize + centre crop + normalise
as the folder's ``preprocessor_config.json`` says. Embeddings are computed in chunks on the model's device.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .models import IMAGENET_MEAN, IMAGENET_STD, ClipModel, VitModel

_MODES = {0: "nearest", 2: "bilinear", 3: "bicubic"}


def _hw(size, short: int, h: int, w: int) -> tuple[int, int]:
    if isinstance(size, dict) and "shortest_edge" in size:
        s = int(size["shortest_edge"])
    elif isinstance(size, dict):
        return int(size["height"]), int(size["width"])
    else:
        s = int(size if size is not None else short)
    # the shorter side becomes s, the aspect ratio is kept (as Hugging Face's processors do)
    return (s, max(1, int(s * w / h))) if h <= w else (max(1, int(s * h / w)), s)


def preprocess(images: torch.Tensor, cfg: dict, scale: float = 1.0) -> torch.Tensor:
    """Resize / centre-crop / normalise [B,3,H,W] in [0,1] like the model's image processor (in torch).

    ``scale`` multiplies the pixels before normalising (255 reproduces PIE-Bench's 0-255 DINO input).
    """
    x = images.float()
    mode = _MODES.get(int(cfg.get("resample", 3)), "bicubic")
    if cfg.get("do_resize", True):
        h, w = _hw(cfg.get("size"), 224, *x.shape[-2:])
        if (h, w) != tuple(x.shape[-2:]):
            x = F.interpolate(x, size=(h, w), mode=mode, antialias=mode != "nearest",
                              **({} if mode == "nearest" else {"align_corners": False})).clamp(0, 1)
    if cfg.get("do_center_crop", False):
        crop = cfg.get("crop_size", 224)
        ch, cw = (crop["height"], crop["width"]) if isinstance(crop, dict) else (int(crop), int(crop))
        top, left = max(0, (x.shape[-2] - ch) // 2), max(0, (x.shape[-1] - cw) // 2)
        x = x[..., top:top + ch, left:left + cw]
    x = x * scale
    if cfg.get("do_normalize", True):
        mean = torch.tensor(cfg.get("image_mean", IMAGENET_MEAN), dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(cfg.get("image_std", IMAGENET_STD), dtype=x.dtype).view(1, 3, 1, 1)
        x = (x - mean) / std
    return x


def _chunked(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, chunk: int) -> torch.Tensor:
    return torch.cat([fn(x[i:i + chunk]) for i in range(0, x.shape[0], chunk)])


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def clip_image_embeds(clip: ClipModel, images: torch.Tensor, chunk: int = 32) -> torch.Tensor:
    """Unit CLIP image embeddings [B,D] (float32, CPU)."""
    dev = _device(clip.model)
    dtype = next(clip.model.parameters()).dtype

    def run(x: torch.Tensor) -> torch.Tensor:
        return clip.image_features(preprocess(x, clip.image_cfg).to(dev, dtype)).float().cpu()

    return F.normalize(_chunked(run, images, chunk), dim=-1)


@torch.inference_mode()
def clip_text_embeds(clip: ClipModel, texts: list[str]) -> torch.Tensor:
    """Unit CLIP text embeddings [N,D] (float32, CPU); prompts past the model's length are truncated.
    A prompt repeated in ``texts`` is encoded once (DreamBench scores 4 images per prompt)."""
    texts = list(texts)
    unique = list(dict.fromkeys(texts))
    emb = F.normalize(clip.text_features(unique).float().cpu(), dim=-1)
    if len(unique) == len(texts):
        return emb
    where = {t: i for i, t in enumerate(unique)}
    return emb[torch.tensor([where[t] for t in texts])]


def clip_t(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """CLIP-T per row: cos(image, its prompt) (text_embeds [B,D] or [1,D])."""
    return (image_embeds * text_embeds).sum(-1)


def mean_pairwise_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per row of ``a``: the mean cosine to every row of ``b`` (CLIP-I, DINO), [A]."""
    return (a @ b.T).mean(1)


def directional(src: torch.Tensor, out: torch.Tensor, t_src: torch.Tensor, t_out: torch.Tensor) -> torch.Tensor:
    """InstructPix2Pix's CLIP directional similarity per row (unit embeddings in, [B] out)."""
    return F.cosine_similarity(out - src, t_out - t_src, dim=-1)


@torch.inference_mode()
def dino_embeds(vit: VitModel, images: torch.Tensor, chunk: int = 32) -> torch.Tensor:
    """Unit DINO CLS embeddings [B,D]: the last hidden state's CLS token (after the final LayerNorm)."""
    dev, dtype = _device(vit.model), next(vit.model.parameters()).dtype
    size = int(vit.model.config.image_size)

    def run(x: torch.Tensor) -> torch.Tensor:
        px = preprocess(x, vit.image_cfg).to(dev, dtype)
        out = vit.model(pixel_values=px, interpolate_pos_encoding=tuple(px.shape[-2:]) != (size, size))
        return out.last_hidden_state[:, 0].float().cpu()

    return F.normalize(_chunked(run, images, chunk), dim=-1)


def _key_linear(model: torch.nn.Module) -> torch.nn.Module:
    """The last block's key projection (its output: every head's keys, concatenated)."""
    layers = getattr(model, "layers", None) or model.encoder.layer  # transformers >= 5 / 4.x
    attn = layers[-1].attention
    return getattr(attn, "k_proj", None) or attn.attention.key  # transformers >= 5 / 4.x


def _resize_max(images: torch.Tensor, size: int = 224, max_size: int = 480) -> torch.Tensor:
    """torchvision's Resize(224, max_size=480) on tensors (its size arithmetic; bilinear, antialiased)."""
    h, w = images.shape[-2:]
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    if new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), max_size
    new = (new_long, new_short) if w <= h else (new_short, new_long)
    if new == (h, w):
        return images.float()
    return F.interpolate(images.float(), size=new, mode="bilinear", antialias=True, align_corners=False)


@torch.inference_mode()
def key_self_similarity(vit: VitModel, images: torch.Tensor, compat: bool = False, chunk: int = 8) -> torch.Tensor:
    """[B,T,T] cosine self-similarity of the last layer's keys (T = 1 + patches), as in Splicing ViT / PIE-Bench.

    ``compat`` feeds 0-255 pixel values to the ImageNet normalisation, as the PIE-Bench code does.
    """
    dev, dtype = _device(vit.model), next(vit.model.parameters()).dtype
    size = int(vit.model.config.image_size)
    key = _key_linear(vit.model)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def run(x: torch.Tensor) -> torch.Tensor:
        px = ((_resize_max(x) * (255.0 if compat else 1.0) - mean) / std).to(dev, dtype)
        seen: list[torch.Tensor] = []
        hook = key.register_forward_hook(lambda _m, _i, out: seen.append(out))
        try:
            vit.model(pixel_values=px, interpolate_pos_encoding=tuple(px.shape[-2:]) != (size, size))
        finally:
            hook.remove()
        keys = F.normalize(seen[-1].float(), dim=-1, eps=1e-8)  # [b, T, heads*dim]
        return (keys @ keys.transpose(1, 2)).cpu()

    return _chunked(run, images, chunk)


def structure_distance(vit: VitModel, x: torch.Tensor, y: torch.Tensor, compat: bool = False) -> torch.Tensor:
    """PIE-Bench's structure distance per row: MSE of the two key self-similarity matrices, [B]."""
    a = key_self_similarity(vit, x, compat)
    b = key_self_similarity(vit, y, compat)
    return ((a - b) ** 2).flatten(1).mean(1)
