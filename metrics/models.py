"""Metric networks from local model folders (docs/methods.md §9): never a hub call, never torch.hub.

Each metric model is a folder ``<search dir>/<name>/`` (ComfyUI registers ``models/editlab_metrics/``):

- CLIP (CLIP-T, CLIP-I, directional): a Hugging Face ``CLIPModel`` folder (``config.json``,
  ``model.safetensors``, ``vocab.json``, ``merges.txt``, optional ``preprocessor_config.json``), e.g.
  ``openai/clip-vit-large-patch14`` (the model PIE-Bench and torchmetrics' CLIPScore use).
- DINO (subject fidelity, ViT-S/16 CLS) and structure distance (ViT-B/8 keys): Hugging Face ``ViTModel``
  folders, e.g. ``facebook/dino-vits16`` and ``facebook/dino-vitb8``.
- LPIPS: torchmetrics ships the linear heads; the backbone is torchvision's ImageNet file, put in
  ``lpips/`` (torchmetrics would otherwise download it through torch.hub).
- KID features: torchvision's Inception-v3 ImageNet file in ``inception/`` (2048-d pool features). These
  are not the TF-FID Inception weights of torch-fidelity, so absolute KID values differ from published ones.

Loaded models are cached per process (keyed by folder and file times); the ComfyUI nodes hand them to
ComfyUI's memory management.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from ..errors import EditLabError
from .names import DEFAULT_NAMES, MODEL_FOLDER  # noqa: F401 (re-exported)

HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
LPIPS_BACKBONES = {  # LPIPS net -> (torchvision constructor, the file torchvision publishes)
    "alex": ("alexnet", "alexnet-owt-7be5be79.pth"),
    "squeeze": ("squeezenet1_1", "squeezenet1_1-b8a52dc0.pth"),
    "vgg": ("vgg16", "vgg16-397923af.pth"),
}
INCEPTION_FILE = "inception_v3_google-0cc3c7bd.pth"
WHERE = {
    "clip": "a Hugging Face CLIPModel folder, e.g. openai/clip-vit-large-patch14",
    "dino": "a Hugging Face ViTModel folder, e.g. facebook/dino-vits16",
    "structure": "a Hugging Face ViTModel folder, e.g. facebook/dino-vitb8",
    "lpips": "the ImageNet weights file torchvision publishes for the backbone (its models page)",
    "inception": f"torchvision's published Inception-v3 ImageNet weights file {INCEPTION_FILE}",
}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def model_path(kind: str, name: str, search_dirs: Sequence[str]) -> str:
    """The folder ``name`` of a ``kind`` metric model under the first search dir that has it.

    ``name`` is confined to the search dirs (realpath), so ``..`` cannot leave them.
    """
    searched = []
    for base in search_dirs:
        root = os.path.realpath(base)
        path = os.path.realpath(os.path.join(root, name))
        if path != root and not path.startswith(root + os.sep):
            raise EditLabError(f"{kind} model name {name!r} leaves the model folder {root}; give a folder name inside it")
        searched.append(path)
        if os.path.isdir(path):
            return path
    raise EditLabError(f"{kind} model folder {name!r} not found; searched {searched or 'no folder'}. "
                       f"Put {WHERE[kind]} there (files expected: {', '.join(expected_files(kind))}).")


def expected_files(kind: str, net: str = "alex") -> list[str]:
    if kind == "clip":
        return ["config.json", "model.safetensors (or pytorch_model.bin)", "vocab.json", "merges.txt"]
    if kind in ("dino", "structure"):
        return ["config.json", "model.safetensors (or pytorch_model.bin)"]
    if kind == "lpips":
        return [LPIPS_BACKBONES[net][1]]
    return [INCEPTION_FILE]


def _require(path: str, kind: str, groups: list[tuple[str, ...]], net: str = "alex") -> None:
    missing = [" or ".join(g) for g in groups if not any(os.path.isfile(os.path.join(path, f)) for f in g)]
    if missing:
        raise EditLabError(f"{kind} model folder {path} lacks {', '.join(missing)} "
                           f"(expected: {', '.join(expected_files(kind, net))}; get {WHERE[kind]})")


def _config(path: str, kind: str, model_types: tuple[str, ...]) -> dict:
    with open(os.path.join(path, "config.json"), encoding="utf-8") as fh:
        config = json.load(fh)
    if config.get("model_type") not in model_types:
        raise EditLabError(f"{kind} model folder {path} holds a {config.get('model_type')!r} model; expected "
                           f"{' or '.join(model_types)} ({WHERE[kind]})")
    return config


def image_config(path: str, default_mean: tuple, default_std: tuple, size: int) -> dict:
    """The folder's ``preprocessor_config.json`` (resize / crop / mean / std), or the model family's default."""
    cfg: dict[str, Any] = {"size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size},
                           "do_center_crop": True, "resample": 3, "image_mean": list(default_mean),
                           "image_std": list(default_std)}
    file = os.path.join(path, "preprocessor_config.json")
    if os.path.isfile(file):
        with open(file, encoding="utf-8") as fh:
            cfg.update(json.load(fh))
    for key in ("size", "crop_size"):
        # a bare number means a square for ViT's processor and the shorter side for CLIP's (as in transformers)
        if isinstance(cfg.get(key), (int, float)):
            n = int(cfg[key])
            square = key == "crop_size" or default_mean == IMAGENET_MEAN
            cfg[key] = {"height": n, "width": n} if square else {"shortest_edge": n}
    return cfg


_CACHE: dict[tuple, Any] = {}


def _cached(key_path: str, key: tuple, build: Callable[[], Any]) -> Any:
    # Keyed by the files' modification times too, so a replaced model is reloaded.
    stamp = tuple(sorted((e.name, e.stat().st_mtime_ns) for e in os.scandir(key_path) if e.is_file()))
    full = (*key, key_path, stamp)
    if full not in _CACHE:
        _CACHE[full] = build()
    return _CACHE[full]


def clear_cache() -> None:
    _CACHE.clear()


def _frozen(module: torch.nn.Module) -> torch.nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


@dataclass
class ClipModel:
    """A local CLIP: the network, its tokenizer and its image preprocessing."""

    model: Any
    tokenizer: Any
    image_cfg: dict
    path: str
    max_length: int = 77
    label: str = ""

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Projected image embeddings of preprocessed pixels [B,3,h,w] (not normalised)."""
        return _tensor(self.model.get_image_features(pixel_values=pixels))

    def text_features(self, texts: list[str]) -> torch.Tensor:
        tok = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        device = next(self.model.parameters()).device
        return _tensor(self.model.get_text_features(input_ids=tok["input_ids"].to(device),
                                                    attention_mask=tok["attention_mask"].to(device)))


def _tensor(out: Any) -> torch.Tensor:
    # transformers >= 5 returns a model output whose pooler_output is the projected embedding.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@dataclass
class VitModel:
    """A local ViT (DINO): the network and its image preprocessing."""

    model: Any
    image_cfg: dict
    path: str
    patch: int = 16
    label: str = ""


@dataclass
class FeatureModel:
    """A plain feature network (LPIPS, Inception) and what it is."""

    module: torch.nn.Module
    path: str
    label: str = ""
    extra: dict = field(default_factory=dict)


def load_clip(name: str, search_dirs: Sequence[str]) -> ClipModel:
    path = model_path("clip", name, search_dirs)
    _require(path, "clip", [("config.json",)])
    config = _config(path, "clip", ("clip",))  # the layout first: a wrong model is named as such
    _require(path, "clip", [HF_WEIGHTS, ("vocab.json", "tokenizer.json"), ("merges.txt", "tokenizer.json")])

    def build() -> ClipModel:
        from transformers import CLIPModel, CLIPTokenizer
        model = _frozen(CLIPModel.from_pretrained(path, local_files_only=True, torch_dtype=torch.float32))
        tokenizer = CLIPTokenizer.from_pretrained(path, local_files_only=True)
        size = int(config.get("vision_config", {}).get("image_size", 224))
        max_len = int(config.get("text_config", {}).get("max_position_embeddings", 77))
        return ClipModel(model, tokenizer, image_config(path, CLIP_MEAN, CLIP_STD, size), path, max_len,
                         f"CLIP {name}")

    return _cached(path, ("clip",), build)


def load_vit(kind: str, name: str, search_dirs: Sequence[str]) -> VitModel:
    """A DINO ViT (``kind`` 'dino' for the CLS embedding, 'structure' for the last-layer keys)."""
    path = model_path(kind, name, search_dirs)
    _require(path, kind, [("config.json",)])
    config = _config(path, kind, ("vit",))
    _require(path, kind, [HF_WEIGHTS])

    def build() -> VitModel:
        from transformers import ViTModel
        model = _frozen(ViTModel.from_pretrained(path, local_files_only=True, add_pooling_layer=False,
                                                 torch_dtype=torch.float32))
        size = int(config.get("image_size", 224))
        cfg = image_config(path, IMAGENET_MEAN, IMAGENET_STD, size)
        if not os.path.isfile(os.path.join(path, "preprocessor_config.json")):  # ViTImageProcessor's defaults
            cfg.update(size={"height": size, "width": size}, do_center_crop=False, resample=2)
        return VitModel(model, cfg, path,
                        int(config.get("patch_size", 16)), f"DINO {name}")

    return _cached(path, (kind,), build)


def load_lpips(net: str, search_dirs: Sequence[str], name: str = DEFAULT_NAMES["lpips"]) -> FeatureModel:
    """torchmetrics' LPIPS (its shipped linear heads) on a torchvision backbone read from a local file."""
    if net not in LPIPS_BACKBONES:
        raise EditLabError(f"LPIPS net {net!r} is not one of {list(LPIPS_BACKBONES)}")
    path = model_path("lpips", name, search_dirs)
    arch, file = LPIPS_BACKBONES[net]
    _require(path, "lpips", [(file,)], net)

    def build() -> FeatureModel:
        import torchvision
        from torchmetrics.functional.image.lpips import _NoTrainLpips
        # pnet_rand=True builds the backbone without torchvision's download; the heads are torchmetrics' file.
        lpips = _NoTrainLpips(net=net, pretrained=True, pnet_rand=True)
        backbone = getattr(torchvision.models, arch)(weights=None)
        backbone.load_state_dict(torch.load(os.path.join(path, file), map_location="cpu", weights_only=True))
        features = backbone.features
        for piece in lpips.net.modules():
            if isinstance(piece, torch.nn.Sequential) and piece is not lpips.net:
                for child_name, child in piece.named_children():
                    if child_name.isdigit():
                        child.load_state_dict(features[int(child_name)].state_dict())
        return FeatureModel(_frozen(lpips), path, f"LPIPS ({net}, torchvision {file})", {"net": net})

    return _cached(path, ("lpips", net), build)


class InceptionPool(torch.nn.Module):
    """torchvision Inception-v3 -> 2048-d pool features of [0,1] images (resized to 299, bilinear)."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net
        self.net.fc = torch.nn.Identity()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.interpolate(images.float(), size=(299, 299), mode="bilinear", align_corners=False)
        return self.net((x - self.mean) / self.std)


def load_inception(search_dirs: Sequence[str], name: str = DEFAULT_NAMES["inception"]) -> FeatureModel:
    path = model_path("inception", name, search_dirs)
    _require(path, "inception", [(INCEPTION_FILE,)])

    def build() -> FeatureModel:
        import torchvision
        # transform_input=True is what torchvision sets for these ImageNet weights (they expect its remapping).
        net = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=True)
        net.load_state_dict(torch.load(os.path.join(path, INCEPTION_FILE), map_location="cpu", weights_only=True))
        return FeatureModel(_frozen(InceptionPool(net)), path, "Inception-v3 (torchvision ImageNet weights)")

    return _cached(path, ("inception",), build)
