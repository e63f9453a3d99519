"""A seeded random-weight BLIP-Diffusion subject-encoder folder with the real on-disk (diffusers) layout.

    <folder>/model_index.json
    <folder>/qformer/config.json                     written by transformers' Blip2Config.save_pretrained
    <folder>/qformer/model.safetensors               the Blip2QFormerModel parameter names (+ position_ids buffer)
    <folder>/qformer/vocab.txt                       a tiny BERT-uncased-style vocabulary
    <folder>/image_processor/preprocessor_config.json  BlipImageProcessor fields (224 px, CLIP mean/std)

Sizes are shrunken (one ViT layer of width 32, one Q-Former layer) except the Q-Former width, which must
equal the CLIP token width (768 for SD1.x) for the subject vectors to splice into a prompt.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = ["dog", "cat", "sneaker", "teapot", "robot", "a", "the", "toy", "cup"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def tiny_configs(width: int = 768) -> dict:
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 224, "patch_size": 14, "hidden_act": "quick_gelu"}
    qformer = {"vocab_size": len(SPECIALS) + len(WORDS) + 1, "hidden_size": width, "num_hidden_layers": 1,
               "num_attention_heads": 12 if width % 12 == 0 else 2, "intermediate_size": 64,
               "max_position_embeddings": 32, "cross_attention_frequency": 1, "encoder_hidden_size": 32}
    return {"vision_config": vision, "qformer_config": qformer, "num_query_tokens": 16}


def write_subject_encoder_folder(folder: Path | str, seed: int = 0, width: int = 768) -> Path:
    from safetensors.torch import save_file
    from transformers import Blip2Config

    from editlab.guidance.subject import SubjectEncoder, config_from_blip2_json

    folder = Path(folder)
    qdir = folder / "qformer"
    qdir.mkdir(parents=True, exist_ok=True)
    cfgs = tiny_configs(width)
    hf = Blip2Config(**cfgs)
    hf.architectures = ["Blip2QFormerModel"]
    hf.save_pretrained(str(qdir))  # the real config.json format (diffs against transformers' defaults)
    cfg = config_from_blip2_json(json.loads((qdir / "config.json").read_text()))

    model = SubjectEncoder(cfg)
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, p in model.state_dict().items():
        if "LayerNorm" in name or "layernorm" in name or "layer_norm" in name:
            base = torch.ones_like(p) if name.endswith("weight") else torch.zeros_like(p)
            sd[name] = base + 0.02 * torch.randn(p.shape, generator=gen)
        else:
            scale = 0.5 if name.endswith(("class_embedding", "position_embedding", "query_tokens")) else 0.2
            fan_in = p.shape[1] if p.ndim >= 2 else 1
            sd[name] = torch.randn(p.shape, generator=gen) * (scale if p.ndim < 2 else 1.0 / fan_in ** 0.5)
    sd["embeddings.position_ids"] = torch.arange(cfg.qformer.max_position_embeddings).expand(1, -1).clone()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(qdir / "model.safetensors"))

    (qdir / "vocab.txt").write_text("\n".join(SPECIALS + WORDS) + "\n", encoding="utf-8")
    pre = folder / "image_processor"
    pre.mkdir(exist_ok=True)
    (pre / "preprocessor_config.json").write_text(json.dumps({
        "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True, "do_rescale": True,
        "do_resize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_processor_type": "BlipImageProcessor", "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3, "rescale_factor": 0.00392156862745098, "size": {"height": 224, "width": 224}}, indent=2))
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "BlipDiffusionPipeline", "ctx_begin_pos": 2,
        "image_processor": ["blip_diffusion", "BlipImageProcessor"],
        "qformer": ["blip_diffusion", "Blip2QFormerModel"], "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["blip_diffusion", "ContextCLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}, indent=2))
    return folder
