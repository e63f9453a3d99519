"""The SDEdit and inversion nodes compose with other model families and with LoRA (real engine).

SDXL: a tiny random SDXL-architecture UNet (``model_base.SDXL``: 2048-d context, pooled + size ADM),
built in memory. LoRA: a random LoRA file loaded by ComfyUI's stock LoraLoaderModelOnly.
"""
from __future__ import annotations

import pytest
import torch
from model_checks import assert_models_differ
from engine_calls import call


def sample(model, positive, negative, noise, sampler, sigmas, latent, cfg=5.0):
    import comfy_extras.nodes_custom_sampler as cs
    guider = cs.CFGGuider().get_guider(model, positive, negative, cfg)[0]
    with torch.inference_mode():
        return cs.SamplerCustomAdvanced().sample(noise, guider, sampler, sigmas, latent)[0]["samples"]


@pytest.fixture(scope="module")
def sdxl(engine):
    import random_models
    model = random_models.tiny_sdxl_model(seed=random_models.weight_seed())
    g = torch.Generator().manual_seed(1)
    pos = [[torch.randn(1, 77, 2048, generator=g), {"pooled_output": torch.randn(1, 1280, generator=g)}]]
    neg = [[torch.randn(1, 77, 2048, generator=g), {"pooled_output": torch.randn(1, 1280, generator=g)}]]
    latent = {"samples": torch.randn(1, 4, 8, 8, generator=g)}
    return model, pos, neg, latent


def test_sdxl_sdedit_matches_native_noising_and_keeps_the_known_region(sdxl):
    import comfy.samplers
    import comfy_extras.nodes_custom_sampler as cs
    model, pos, neg, latent = sdxl
    noised, sigmas = call("EditLabSDEPerturb", model=model, latent=latent, t0=0.6, steps=3, scheduler="normal", seed=3)
    euler = comfy.samplers.sampler_object("euler")
    ours = sample(model, pos, neg, cs.Noise_EmptyNoise(), euler, sigmas, noised)
    native = sample(model, pos, neg, cs.Noise_RandomNoise(3), euler, sigmas, latent)
    torch.testing.assert_close(ours, native, rtol=1e-4, atol=1e-4)
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 16:48] = 1.0
    (inner,) = call("EditLabReverseSDESampler", mode="stochastic", seed=0, repeat=2)
    (masked,) = call("EditLabKnownRegionSampler", sampler=inner, mask_convention="1 = regenerate (ComfyUI)",
                     known_noise="fresh", replace_on="both", seed=0, mask=mask, guide=latent)
    out = sample(model, pos, neg, cs.Noise_EmptyNoise(), masked, sigmas, noised)
    keep = torch.ones_like(out, dtype=torch.bool)
    keep[..., 2:6, 2:6] = False
    assert torch.isfinite(out).all()
    assert torch.allclose(out[keep], latent["samples"][keep], atol=1e-5)


def test_sdxl_inversion_modes(sdxl):
    import comfy.samplers
    import comfy_extras.nodes_custom_sampler as cs
    from editlab.samplers.inversion import psnr
    model, pos, neg, latent = sdxl
    inv, noise, sigmas = call("EditLabDDIMInvert", model=model, positive=pos, latent=latent, steps=4,
                              scheduler="ddim_uniform", guidance=1.0, input_scaling="reference")
    assert inv.source_pooled is not None and inv.source_pooled.shape == (1, 1280)
    (tuned,) = call("EditLabNullTextOptimize", model=model, inversion=inv, negative=neg, guidance=7.5, inner_steps=2,
                    early_stop=1e-5, early_stop_slope=2e-5, learning_rate=1e-2, check_model=True)
    results = {}
    for mode, which in [("direct", inv), ("null-text", tuned), ("negative-prompt", inv), ("plain", inv)]:
        (g,) = call("EditLabInversionGuider", model=model, inversion=which, positive=pos, negative=neg, cfg=7.5,
                    mode=mode, check_model=True)
        with torch.inference_mode():
            out = cs.SamplerCustomAdvanced().sample(cs.Noise_EmptyNoise(), g, comfy.samplers.sampler_object("euler"),
                                                    sigmas, noise)[0]["samples"]
        assert torch.isfinite(out).all()
        results[mode] = psnr(out, latent["samples"])
    assert results["direct"] > 90, results
    assert results["null-text"] > results["plain"], results


@pytest.fixture(scope="module")
def lora_model(engine, sd15):
    """SD1.5 + a random LoRA on every cross-attention projection, through the stock loader."""
    import folder_paths
    import nodes
    import random_models
    model = sd15[0]
    folder = engine.root / "models" / "loras"
    random_models.write_random_lora(model, folder / "editlab_random_lora.safetensors", seed=7)
    folder_paths.add_model_folder_path("loras", str(folder), is_default=True)
    folder_paths.filename_list_cache.clear()
    with torch.inference_mode():
        (patched,) = nodes.LoraLoaderModelOnly().load_lora_model_only(model, "editlab_random_lora.safetensors", 1.0)
    return patched


def test_lora_composes_with_sdedit_and_inversion(engine, sd15, lora_model):
    import comfy.samplers
    import comfy_extras.nodes_custom_sampler as cs
    import nodes
    from editlab.samplers.inversion import psnr
    base, clip, vae = sd15
    # The LoRA changes exactly the cross-attention projections it targets (and nothing else).
    assert assert_models_differ(base, lora_model) == len(lora_model.patches) > 0
    with torch.inference_mode():
        pos = nodes.CLIPTextEncode().encode(clip, "a red boat")[0]
        neg = nodes.CLIPTextEncode().encode(clip, "")[0]
        img = nodes.LoadImage().load_image("editlab_photo.png")[0]
        (latent,) = nodes.VAEEncode().encode(vae, img)
    outs = {}
    for label, model in [("base", base), ("lora", lora_model)]:
        noised, sigmas = call("EditLabSDEPerturb", model=model, latent=latent, t0=0.5, steps=3, scheduler="normal", seed=1)
        (s,) = call("EditLabReverseSDESampler", mode="deterministic", seed=0, repeat=1)
        outs[label] = sample(model, pos, neg, cs.Noise_EmptyNoise(), s, sigmas, noised)
    assert torch.isfinite(outs["lora"]).all() and not torch.allclose(outs["base"], outs["lora"], atol=1e-4)
    inv, noise, sigmas = call("EditLabDDIMInvert", model=lora_model, positive=pos, latent=latent, steps=3,
                              scheduler="ddim_uniform", guidance=1.0, input_scaling="reference")
    (tuned,) = call("EditLabNullTextOptimize", model=lora_model, inversion=inv, negative=neg, guidance=7.5, inner_steps=2,
                    early_stop=1e-5, early_stop_slope=2e-5, learning_rate=1e-2, check_model=True)
    (g,) = call("EditLabInversionGuider", model=lora_model, inversion=tuned, positive=pos, negative=neg, cfg=7.5,
                mode="direct", check_model=True)
    with torch.inference_mode():
        out = cs.SamplerCustomAdvanced().sample(cs.Noise_EmptyNoise(), g, comfy.samplers.sampler_object("euler"),
                                                sigmas, noise)[0]["samples"]
    assert psnr(out, latent["samples"]) > 90
    with pytest.raises(ValueError, match="another model"):  # the LoRA changes the fingerprint
        call("EditLabInversionGuider", model=base, inversion=tuned, positive=pos, negative=neg, cfg=7.5,
             mode="null-text", check_model=True)


@pytest.fixture(scope="module")
def controlnet(engine, sd15):
    """A random ControlNet for the SD1.5-architecture UNet, written in the original LDM layout and loaded
    by ComfyUI's stock ControlNetLoader."""
    import folder_paths
    import nodes
    import random_models
    folder = engine.root / "models" / "controlnet"
    random_models.build_sd15_controlnet(folder / "editlab_random_controlnet.safetensors",
                                        sd15[0].model.model_config.unet_config)
    folder_paths.add_model_folder_path("controlnet", str(folder), is_default=True)
    folder_paths.filename_list_cache.clear()
    with torch.inference_mode():
        return nodes.ControlNetLoader().load_controlnet("editlab_random_controlnet.safetensors")[0]


def test_controlnet_composes_with_sdedit_and_the_known_region_sampler(engine, sd15, controlnet):
    import comfy_extras.nodes_custom_sampler as cs
    import nodes
    model, clip, vae = sd15
    with torch.inference_mode():
        pos = nodes.CLIPTextEncode().encode(clip, "a red boat")[0]
        neg = nodes.CLIPTextEncode().encode(clip, "")[0]
        img, mask = nodes.LoadImage().load_image("editlab_photo.png")
        (latent,) = nodes.VAEEncode().encode(vae, img)
        c_pos, c_neg = nodes.ControlNetApplyAdvanced().apply_controlnet(pos, neg, controlnet, img[..., :3], 1.0,
                                                                       0.0, 1.0, vae=vae)
    noised, sigmas = call("EditLabSDEPerturb", model=model, latent=latent, t0=0.6, steps=3, scheduler="normal", seed=5)
    (inner,) = call("EditLabReverseSDESampler", mode="stochastic", seed=1, repeat=1)
    (masked,) = call("EditLabKnownRegionSampler", sampler=inner, mask_convention="1 = regenerate (ComfyUI)",
                     known_noise="same", replace_on="x_t", seed=0, mask=mask, guide=latent)
    plain = sample(model, pos, neg, cs.Noise_EmptyNoise(), inner, sigmas, noised)
    controlled = sample(model, c_pos, c_neg, cs.Noise_EmptyNoise(), inner, sigmas, noised)
    assert torch.isfinite(controlled).all() and not torch.allclose(plain, controlled, atol=1e-4)
    kept = sample(model, c_pos, c_neg, cs.Noise_EmptyNoise(), masked, sigmas, noised)
    keep = torch.nn.functional.interpolate(mask[None], size=kept.shape[-2:], mode="bilinear")[0] == 0
    keep = keep.expand_as(kept[0])[None]
    assert torch.allclose(kept[keep], latent["samples"][keep], atol=1e-5)
