"""A small noise-aware classifier for classifier guidance (Dhariwal & Nichol; docs/methods.md §10).

File layout (``models/classifiers/``): ``<name>.safetensors`` (the state dict of ``NoisyClassifier``) next to
``<name>.json``::

    {"arch": "editlab_noisy_convnet", "space": "latent", "channels": 4, "num_classes": 10,
     "takes_sigma": true, "width": 64, "depth": 3}

- ``space``: ``latent`` (model-space latents, as the sampler sees them: VAE latent x 0.18215 for SD1.x) or
  ``pixel`` (decoded images in [0, 1], ``[B, 3, H, W]``);
- ``takes_sigma``: the classifier was trained on noisy inputs ``x = x0 + sigma * eps`` and gets ``sigma``.

Architecture ``editlab_noisy_convnet``: a 3x3 stem conv, ``depth`` stages of [GroupNorm, SiLU, stride-2 3x3 conv,
+ a per-channel embedding of ``log(sigma)`` (sinusoidal features -> linear)], global average pooling, a linear
head. To train one: draw ``sigma`` log-uniformly in the model's range, noise clean latents as above and minimise
cross-entropy; save ``state_dict()`` with ``safetensors.torch.save_file`` and write the JSON.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import EditLabError

ARCH = "editlab_noisy_convnet"
SIGMA_FEATURES = 16


@dataclass(frozen=True)
class ClassifierConfig:
    space: str
    channels: int
    num_classes: int
    takes_sigma: bool
    width: int = 64
    depth: int = 3
    arch: str = ARCH

    @classmethod
    def from_dict(cls, raw: dict, where: str) -> "ClassifierConfig":
        missing = [k for k in ("space", "channels", "num_classes", "takes_sigma") if k not in raw]
        if missing:
            raise EditLabError(f"classifier config {where} lacks {missing}; expected keys: arch, space (latent|pixel), "
                               "channels, num_classes, takes_sigma (and optional width, depth)")
        cfg = cls(space=str(raw["space"]), channels=int(raw["channels"]), num_classes=int(raw["num_classes"]),
                  takes_sigma=bool(raw["takes_sigma"]), width=int(raw.get("width", 64)),
                  depth=int(raw.get("depth", 3)), arch=str(raw.get("arch", ARCH)))
        if cfg.arch != ARCH:
            raise EditLabError(f"classifier config {where}: arch {cfg.arch!r} is unknown; this pack builds {ARCH!r}")
        if cfg.space not in ("latent", "pixel"):
            raise EditLabError(f"classifier config {where}: space {cfg.space!r} is not 'latent' or 'pixel'")
        if cfg.space == "pixel" and cfg.channels != 3:
            raise EditLabError(f"classifier config {where}: a pixel-space classifier takes 3 channels, not {cfg.channels}")
        if cfg.channels < 1 or cfg.num_classes < 2 or cfg.width < 8 or cfg.depth < 1:
            raise EditLabError(f"classifier config {where}: need channels >= 1, num_classes >= 2, width >= 8, depth >= 1")
        return cfg


def sigma_features(sigma: torch.Tensor, n: int = SIGMA_FEATURES) -> torch.Tensor:
    """Sinusoidal features of ``log(sigma)`` ``[B, n]`` (sigma spans ~0.03..15 for SD1.x)."""
    freqs = torch.exp(torch.linspace(0.0, math.log(100.0), n // 2, device=sigma.device))
    arg = torch.log(sigma.float().clamp_min(1e-4))[:, None] * freqs[None]
    return torch.cat([arg.sin(), arg.cos()], dim=-1)


class NoisyClassifier(nn.Module):
    """``(x [B, C, h, w], sigma [B]) -> logits [B, classes]`` (architecture ``editlab_noisy_convnet``)."""

    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.stem = nn.Conv2d(cfg.channels, w, 3, padding=1)
        self.norms = nn.ModuleList(nn.GroupNorm(min(8, w), w) for _ in range(cfg.depth))
        self.convs = nn.ModuleList(nn.Conv2d(w, w, 3, stride=2, padding=1) for _ in range(cfg.depth))
        self.sigma_proj = nn.ModuleList(nn.Linear(SIGMA_FEATURES, w) for _ in range(cfg.depth)) if cfg.takes_sigma else None
        self.head = nn.Linear(w, cfg.num_classes)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        emb = sigma_features(sigma.reshape(-1).expand(x.shape[0]).to(x)) if self.sigma_proj is not None else None
        for k, (norm, conv) in enumerate(zip(self.norms, self.convs)):
            h = conv(torch.nn.functional.silu(norm(h)))
            if emb is not None:
                h = h + self.sigma_proj[k](emb)[:, :, None, None]
        return self.head(h.mean((2, 3)))


def load_classifier(weights_path: str) -> NoisyClassifier:
    """A classifier from ``<name>.safetensors`` + ``<name>.json`` (safetensors only; strict key match)."""
    from safetensors.torch import load_file
    config_path = os.path.splitext(weights_path)[0] + ".json"
    if not os.path.isfile(config_path):
        raise EditLabError(f"classifier {weights_path} has no config {config_path}; write one (see the README: "
                           "arch, space, channels, num_classes, takes_sigma)")
    with open(config_path, encoding="utf-8") as fh:
        cfg = ClassifierConfig.from_dict(json.load(fh), config_path)
    net = NoisyClassifier(cfg)
    state = load_file(weights_path)
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong:
        raise EditLabError(f"classifier {weights_path} does not match its config {config_path} (missing {missing[:4]}, "
                           f"unexpected {unexpected[:4]}, shapes {wrong[:4]}); the config must describe these weights")
    net.load_state_dict(state)
    return net.eval().requires_grad_(False)
