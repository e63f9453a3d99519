"""Tiny random metric models written in the real on-disk layouts (for offline tests).

- ``write_clip``: a Hugging Face CLIPModel folder (``save_pretrained`` of a tiny config) with a character-level
  BPE tokenizer (``vocab.json`` + ``merges.txt``) and a ``preprocessor_config.json``.
- ``write_vit``: a Hugging Face ViTModel folder (DINO layout) of a tiny config.
- ``write_lpips_backbone``: torchvision's SqueezeNet-1.1 state dict under its published file name.
- ``write_inception``: torchvision's Inception-v3 state dict (random, float16 to keep it small).
- ``write_default_set``: the metric nodes' default folders (CLIP, both ViTs, LPIPS) in one call.
"""
from __future__ import annotations

import json
import string
from pathlib import Path

import torch


def _tokenizer_files(folder: Path) -> int:
    chars = list(string.ascii_lowercase + string.digits + "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
    vocab: dict[str, int] = {}
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return len(vocab)


def write_clip(folder: Path, seed: int = 0, image_size: int = 32, patch: int = 8) -> Path:
    from transformers import CLIPConfig, CLIPModel
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n_vocab = _tokenizer_files(folder)
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=n_vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=n_vocab - 2,
                         eos_token_id=n_vocab - 1, pad_token_id=n_vocab - 1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=patch),
        projection_dim=16)
    CLIPModel(config).eval().save_pretrained(str(folder), safe_serialization=True)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": image_size},
        "do_center_crop": True, "crop_size": {"height": image_size, "width": image_size}, "resample": 3,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}),
        encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}), encoding="utf-8")
    return folder


def write_vit(folder: Path, seed: int = 0, image_size: int = 32, patch: int = 8) -> Path:
    from transformers import ViTConfig, ViTModel
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       image_size=image_size, patch_size=patch, qkv_bias=True)
    ViTModel(config, add_pooling_layer=False).eval().save_pretrained(str(folder), safe_serialization=True)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "do_resize": True, "size": {"height": image_size, "width": image_size}, "resample": 2,
        "do_normalize": True, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}),
        encoding="utf-8")
    return folder


def write_lpips_backbone(folder: Path, seed: int = 0) -> Path:
    import torchvision
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    torch.save(torchvision.models.squeezenet1_1(weights=None).state_dict(), folder / "squeezenet1_1-b8a52dc0.pth")
    return folder


def write_inception(folder: Path, seed: int = 0) -> Path:
    import torchvision
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    net = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    torch.save({k: (v.half() if v.is_floating_point() else v) for k, v in net.state_dict().items()},
               folder / "inception_v3_google-0cc3c7bd.pth")
    return folder


class TinyFeatures(torch.nn.Module):
    """A stand-in feature extractor for KID: a fixed random conv + global pool, [N,3,H,W] -> [N,16]."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = torch.nn.Conv2d(3, 16, 3)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.3)
            self.conv.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x.float())).mean((2, 3))


def write_default_set(root: Path) -> Path:
    """The metric nodes' default folders under ``root`` (names as metrics/names.py's DEFAULT_NAMES): CLIP, the
    structure ViT (dino-vitb8), the DINO ViT (dino-vits16) and the LPIPS SqueezeNet backbone."""
    root = Path(root)
    write_clip(root / "clip-vit-large-patch14")
    write_vit(root / "dino-vitb8", seed=1)
    write_vit(root / "dino-vits16", seed=2)
    write_lpips_backbone(root / "lpips")
    return root
