"""Tiny random flow-matching models (SD3 / MMDiT and Flux architectures) that ComfyUI's own detection recognises.

Each model's state dict is built in the real key layout (the keys and shapes of ComfyUI's own module,
enumerated on the meta device, every tensor filled from the seed) and goes through ComfyUI's detection:

- SD3: ``comfy.sd.load_diffusion_model_state_dict`` (detection derives every width from the shapes:
  depth 2 -> hidden 128, 2 heads of 64, 16 latent channels, context 4096, pooled 2048);
- Flux: ``comfy.model_detection.model_config_from_unet`` picks the family (``Flux`` with a
  ``guidance_in`` layer = dev-like, guidance-distilled; ``FluxSchnell`` without), and only the widths
  that detection hard-codes for the full-size model (hidden 3072, 24 heads) are set to the tiny ones
  (hidden 128 = 1 head of 128, axes [16, 56, 56]) before the weights are loaded strictly.

The returned ``ModelPatcher`` holds ``comfy.model_base.SD3`` / ``comfy.model_base.Flux``; the builders
assert it. Conditioning helpers return matching random CONDITIONING lists.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from random_models import ensure_comfy_importable

SD3_DEPTH = 2          # hidden = 64 * depth = 128
SD3_POS_MAX = 16       # latent up to 32x32 (patch 2)
FLUX_HIDDEN = 128
CONTEXT_DIM = 4096     # T5-XXL width, both families
SD3_POOLED = 2048      # CLIP-L + CLIP-G pooled
FLUX_POOLED = 768      # CLIP-L pooled


def _fill(shapes: dict[str, torch.Size], seed: int) -> dict[str, torch.Tensor]:
    """Every tensor from the seed: norms 1, other vectors small, matrices ~ 1 / sqrt(fan_in)."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if len(shape) <= 1:
            if "norm" in name and (name.endswith("weight") or name.endswith("scale")):
                t = torch.ones(shape)
            else:
                t = torch.randn(shape, generator=gen) * 0.02
        else:
            fan_in = max(1, math.prod(shape[1:]))
            t = torch.randn(shape, generator=gen) / math.sqrt(fan_in)
        sd[name] = t.contiguous()
    return sd


def _meta_shapes(module_cls, **config) -> dict[str, torch.Size]:
    import comfy.ops

    net = module_cls(device="meta", dtype=torch.float32, operations=comfy.ops.disable_weight_init, **config)
    return {k: v.shape for k, v in net.state_dict().items()}


def _patcher(model) -> Any:
    import comfy.model_management
    import comfy.model_patcher

    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def sd3_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random MMDiT (SD3-medium layout, no qk-norm) state dict, unprefixed keys."""
    import comfy.ldm.modules.diffusionmodules.mmdit as mmdit

    hidden = 64 * SD3_DEPTH
    shapes = _meta_shapes(
        mmdit.MMDiT, patch_size=2, in_channels=16, out_channels=16, depth=SD3_DEPTH,
        adm_in_channels=SD3_POOLED, num_patches=SD3_POS_MAX ** 2, pos_embed_max_size=SD3_POS_MAX,
        context_embedder_config={"target": "torch.nn.Linear",
                                 "params": {"in_features": CONTEXT_DIM, "out_features": hidden}})
    return _fill(shapes, seed)


def tiny_sd3_model(seed: int = 0, comfyui_path=None) -> Any:
    """A ``ModelPatcher`` around a random SD3-architecture model (``comfy.model_base.SD3``, CONST sampling, shift 3)."""
    ensure_comfy_importable(comfyui_path)
    import comfy.model_base
    import comfy.sd
    import comfy.supported_models

    sd = sd3_state_dict(seed)
    patcher = comfy.sd.load_diffusion_model_state_dict(dict(sd), model_options={"dtype": torch.float32})
    assert patcher is not None, "ComfyUI did not recognise the tiny SD3 state dict"
    loaded = patcher.model.diffusion_model.state_dict()
    assert set(loaded) == set(sd) and all(torch.equal(loaded[k], sd[k]) for k in sd), "SD3 weights did not load"
    assert type(patcher.model) is comfy.model_base.SD3, type(patcher.model)
    assert type(patcher.model.model_config) is comfy.supported_models.SD3, type(patcher.model.model_config)
    return patcher


def flux_state_dict(seed: int = 0, *, guidance_embed: bool = True) -> dict[str, torch.Tensor]:
    """A random Flux state dict (1 double + 1 single block, hidden 128), unprefixed keys."""
    import comfy.ldm.flux.model as flux

    shapes = _meta_shapes(flux.Flux, **_flux_params(guidance_embed))
    return _fill(shapes, seed)


def _flux_params(guidance_embed: bool) -> dict[str, Any]:
    return dict(in_channels=16, out_channels=16, vec_in_dim=FLUX_POOLED, context_in_dim=CONTEXT_DIM,
                hidden_size=FLUX_HIDDEN, mlp_ratio=4.0, num_heads=1, depth=1, depth_single_blocks=1,
                axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=guidance_embed)


def tiny_flux_model(seed: int = 0, *, guidance_embed: bool = True, comfyui_path=None) -> Any:
    """A ``ModelPatcher`` around a random Flux-architecture model (``comfy.model_base.Flux``).

    ``guidance_embed=True``: dev-like (guidance-distilled, ``supported_models.Flux``, ModelSamplingFlux);
    ``False``: schnell-like (``supported_models.FluxSchnell``, flow sampling with shift 1).
    """
    ensure_comfy_importable(comfyui_path)
    import comfy.model_base
    import comfy.model_detection
    import comfy.supported_models

    sd = flux_state_dict(seed, guidance_embed=guidance_embed)
    config = comfy.model_detection.model_config_from_unet(sd, "")
    want = comfy.supported_models.Flux if guidance_embed else comfy.supported_models.FluxSchnell
    assert type(config) is want, f"detected {type(config).__name__}, expected {want.__name__}"
    assert config.unet_config["guidance_embed"] is guidance_embed
    # Detection hard-codes the full-size widths (hidden 3072, 24 heads); everything else it read from the keys.
    config.unet_config.update(hidden_size=FLUX_HIDDEN, num_heads=1)
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model(sd, "")
    model.diffusion_model.load_state_dict(sd, strict=True)
    assert type(model) is comfy.model_base.Flux, type(model)
    return _patcher(model)


def sd3_conditioning(seed: int = 1, tokens: int = 8, batch: int = 1) -> list:
    """Random SD3 CONDITIONING: ``[[cond [B, T, 4096], {"pooled_output": [B, 2048]}]]``."""
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, tokens, CONTEXT_DIM, generator=gen),
             {"pooled_output": torch.randn(batch, SD3_POOLED, generator=gen)}]]


def flux_conditioning(seed: int = 1, tokens: int = 8, batch: int = 1, guidance: float | None = 3.5) -> list:
    """Random Flux CONDITIONING: ``[[cond [B, T, 4096], {"pooled_output": [B, 768], "guidance": g}]]``.

    ``guidance`` is the distilled CFG scale a dev model reads (FluxGuidance node); ``None`` leaves it out
    (schnell ignores it).
    """
    gen = torch.Generator().manual_seed(seed)
    extra: dict[str, Any] = {"pooled_output": torch.randn(batch, FLUX_POOLED, generator=gen)}
    if guidance is not None:
        extra["guidance"] = float(guidance)
    return [[torch.randn(batch, tokens, CONTEXT_DIM, generator=gen), extra]]


def flow_latent(seed: int = 2, size: int = 8, batch: int = 1) -> dict:
    """A random 16-channel LATENT dict (unscaled, as a VAE would give) of ``size`` x ``size``."""
    gen = torch.Generator().manual_seed(seed)
    return {"samples": torch.randn(batch, 16, size, size, generator=gen)}
