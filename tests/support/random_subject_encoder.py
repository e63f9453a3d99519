"""A seeded random-weight BLIP-Diffusion subject-encoder folder with the real on-disk (diffusers) layout.

    <folder>/model_index.json
    <folder>/qformer/config.json                     written by transformers' Blip2Config.save_pretrained
    <folder>/qformer/model.safetensors               the Blip2QFormerModel tensor names (+ position_ids buffer),
                                                     listed independently in :func:`release_key_shapes`
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


def release_key_shapes(cfgs: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape of the release's ``qformer/model.safetensors`` for a config of
    :func:`tiny_configs`' form, written out from the public naming of diffusers' ``Blip2QFormerModel``
    (``pipelines/blip_diffusion/modeling_blip2.py``: BLIP-2 vision encoder, BERT-style Q-Former with
    ``*_query`` FFNs for the query tokens, ``proj_layer``) - deliberately not from EditLab's module, so a
    naming or shape mistake there cannot hide in a file written from it."""
    v, q = cfgs["vision_config"], cfgs["qformer_config"]
    dv, iv, patch = v["hidden_size"], v["intermediate_size"], v["patch_size"]
    h, iq, e = q["hidden_size"], q["intermediate_size"], q["encoder_hidden_size"]
    n_pos = q["max_position_embeddings"]
    shapes: dict[str, tuple[int, ...]] = {
        "query_tokens": (1, cfgs["num_query_tokens"], h),
        "embeddings.position_ids": (1, n_pos),  # a buffer transformers saves with the weights
        "embeddings.word_embeddings.weight": (q["vocab_size"], h),
        "embeddings.position_embeddings.weight": (n_pos, h),
        "visual_encoder.embeddings.class_embedding": (1, 1, dv),
        "visual_encoder.embeddings.position_embedding": (1, (v["image_size"] // patch) ** 2 + 1, dv),
        "visual_encoder.embeddings.patch_embedding.weight": (dv, 3, patch, patch),
        "proj_layer.dense1.weight": (4 * h, h), "proj_layer.dense1.bias": (4 * h,),
        "proj_layer.dense2.weight": (h, 4 * h), "proj_layer.dense2.bias": (h,),
    }

    def norm(name: str, size: int) -> None:
        shapes[f"{name}.weight"] = (size,)
        shapes[f"{name}.bias"] = (size,)

    def linear(name: str, out: int, inp: int) -> None:
        shapes[f"{name}.weight"] = (out, inp)
        shapes[f"{name}.bias"] = (out,)

    norm("embeddings.LayerNorm", h)
    norm("proj_layer.LayerNorm", h)
    norm("visual_encoder.pre_layernorm", dv)
    norm("visual_encoder.post_layernorm", dv)
    for i in range(v["num_hidden_layers"]):
        stem = f"visual_encoder.encoder.layers.{i}"
        linear(f"{stem}.self_attn.qkv", 3 * dv, dv)
        linear(f"{stem}.self_attn.projection", dv, dv)
        norm(f"{stem}.layer_norm1", dv)
        linear(f"{stem}.mlp.fc1", iv, dv)
        linear(f"{stem}.mlp.fc2", dv, iv)
        norm(f"{stem}.layer_norm2", dv)
    for i in range(q["num_hidden_layers"]):
        stem = f"encoder.layer.{i}"
        kinds = [("attention", h)] + ([("crossattention", e)] if i % q["cross_attention_frequency"] == 0 else [])
        for kind, kv in kinds:
            linear(f"{stem}.{kind}.attention.query", h, h)
            linear(f"{stem}.{kind}.attention.key", h, kv)
            linear(f"{stem}.{kind}.attention.value", h, kv)
            linear(f"{stem}.{kind}.output.dense", h, h)
            norm(f"{stem}.{kind}.output.LayerNorm", h)
        for ffn, out in (("intermediate", "output"), ("intermediate_query", "output_query")):
            linear(f"{stem}.{ffn}.dense", iq, h)
            linear(f"{stem}.{out}.dense", h, iq)
            norm(f"{stem}.{out}.LayerNorm", h)
    return shapes


def write_subject_encoder_folder(folder: Path | str, seed: int = 0, width: int = 768) -> Path:
    from safetensors.torch import save_file
    from transformers import Blip2Config

    folder = Path(folder)
    qdir = folder / "qformer"
    qdir.mkdir(parents=True, exist_ok=True)
    cfgs = tiny_configs(width)
    hf = Blip2Config(**cfgs)
    hf.architectures = ["Blip2QFormerModel"]
    hf.save_pretrained(str(qdir))  # the real config.json format (diffs against transformers' defaults)

    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in sorted(release_key_shapes(cfgs).items()):
        if name == "embeddings.position_ids":
            sd[name] = torch.arange(shape[1]).expand(1, -1).clone()
        elif "LayerNorm" in name or "layernorm" in name or "layer_norm" in name:
            base = torch.ones(shape) if name.endswith("weight") else torch.zeros(shape)
            sd[name] = base + 0.02 * torch.randn(shape, generator=gen)
        else:
            scale = 0.5 if name.endswith(("class_embedding", "position_embedding", "query_tokens")) else 0.2
            fan_in = shape[1] if len(shape) >= 2 else 1
            sd[name] = torch.randn(shape, generator=gen) * (scale if len(shape) < 2 else 1.0 / fan_in ** 0.5)
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
