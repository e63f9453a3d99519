"""InstructPix2Pix encode + Dual CFG Combiner on the real ComfyUI engine, with a random 8-channel
SD1.5-architecture InstructPix2Pix checkpoint, checked against diffusers' StableDiffusionInstructPix2PixPipeline.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from model_checks import assert_models_differ
from engine_calls import call

IP2P_WORKFLOWS = ["InstructPix2Pix - edit a photo (dual CFG)", "InstructPix2Pix - scale sweep grid (s_I x s_T)",
                  "Dual CFG - prompt vs extra condition balance"]
FAST = {"steps": 3}
INSTRUCTION = "make it a watercolor painting"
ODD_IMAGE = "editlab_dual_cfg_odd.png"  # 70 x 61 px: not a multiple of 8
# Parity with diffusers (fp32, CPU): final latents within this relative max error (max |ours - ref| / max |ref|).
PARITY_RTOL = 2e-5


def ids_of(prompt: dict, class_type: str) -> list[str]:
    return [k for k, v in prompt.items() if v["class_type"] == class_type]


@pytest.fixture(scope="module")
def ip2p_checkpoint(engine) -> Path:
    """The 8-channel checkpoint under the name the workflows load, in the engine's checkpoints folder."""
    import folder_paths
    import random_models
    from editlab.headless.examples_dual_cfg import IP2P_CHECKPOINT

    path = engine.root / "models" / "checkpoints" / IP2P_CHECKPOINT
    if not path.exists():
        random_models.build_sd15_checkpoint(path, seed=random_models.weight_seed(1), in_channels=8, dtype=torch.float32)
    folder_paths.filename_list_cache.clear()  # ComfyUI caches folder listings
    rng = np.random.default_rng(1)
    from PIL import Image
    Image.fromarray((rng.random((61, 70, 3)) * 255).astype(np.uint8)).save(engine.root / "input" / ODD_IMAGE)
    return path


@pytest.fixture(scope="module")
def ip2p(ip2p_checkpoint):
    """(model, clip, vae) by ComfyUI's stock loader, with the text encoder in fp32 for the fp32 parity check
    (ComfyUI's default text-encoder dtype is fp16, even on CPU; ``--fp32-text-enc`` is the user's switch)."""
    import comfy.sd
    with torch.inference_mode():
        out = comfy.sd.load_checkpoint_guess_config(str(ip2p_checkpoint), output_vae=True, output_clip=True,
                                                    te_model_options={"dtype": torch.float32})
    assert type(out[0].model).__name__ == "SD15_instructpix2pix"
    return out[:3]


@pytest.fixture(scope="module")
def photo(engine):
    import nodes
    return nodes.LoadImage().load_image("editlab_photo.png")[0]


@pytest.fixture(scope="module")
def levels(ip2p, photo):
    _, clip, vae = ip2p
    return call("EditLabInstructPix2PixEncode", clip=clip, vae=vae, image=photo, instruction=INSTRUCTION,
                negative="", size_fit="crop")


def run_guider(guider, latent, sigmas, sampler="euler", noise=None):
    import comfy.samplers
    import comfy_extras.nodes_custom_sampler as cs
    with torch.inference_mode():
        out = cs.SamplerCustomAdvanced().sample(noise or cs.Noise_RandomNoise(0), guider,
                                                comfy.samplers.sampler_object(sampler), sigmas, latent)
    return out[0]["samples"]


def schedule(model, steps=3, scheduler="normal"):
    import comfy_extras.nodes_custom_sampler as cs
    return cs.BasicScheduler().get_sigmas(model, scheduler, steps, 1.0)[0]


def combiner(model, levels, extra=7.5, base=1.5, shape="constant", extra_end=None, base_end=None, rescale=0.0):
    both, image_only, neither, _ = levels
    return call("EditLabDualCFGCombiner", model=model, both=both, base_only=image_only, neither=neither,
                extra_scale=extra, base_scale=base, schedule=shape,
                extra_scale_end=extra if extra_end is None else extra_end,
                base_scale_end=base if base_end is None else base_end, rescale=rescale)[0]


# -- the encoder ------------------------------------------------------------------------------------

def test_encode_makes_the_three_levels_with_the_unscaled_posterior_mode(ip2p, photo, levels):
    _, _, vae = ip2p
    both, image_only, neither, latent = levels
    with torch.no_grad():
        pixels = photo[:, :, :, :3].movedim(-1, 1) * 2 - 1
        moments = vae.first_stage_model.quant_conv(vae.first_stage_model.encoder(pixels))
    mode = moments.chunk(2, dim=1)[0]  # posterior mean = mode, no 0.18215 scaling
    img = both[0][1]["concat_latent_image"]
    torch.testing.assert_close(img, mode, rtol=1e-4, atol=1e-4)
    assert torch.equal(image_only[0][1]["concat_latent_image"], img)
    assert torch.equal(neither[0][1]["concat_latent_image"], torch.zeros_like(img))
    assert torch.equal(image_only[0][0], neither[0][0]) and not torch.equal(both[0][0], neither[0][0])
    assert latent["samples"].shape == (1, 4, 8, 8) and not latent["samples"].any()


def test_sizes_that_are_not_a_multiple_of_8_are_cropped_or_resized_as_documented(engine, ip2p, ip2p_checkpoint):
    import nodes
    _, clip, vae = ip2p
    odd = nodes.LoadImage().load_image(ODD_IMAGE)[0]  # 70 x 61
    kw = dict(clip=clip, vae=vae, image=odd, instruction=INSTRUCTION, negative="")
    cropped = call("EditLabInstructPix2PixEncode", size_fit="crop", **kw)
    resized = call("EditLabInstructPix2PixEncode", size_fit="resize", **kw)
    for out in (cropped, resized):
        assert out[3]["samples"].shape == (1, 4, 7, 8)  # 56 x 64 px
        assert out[0][0][1]["concat_latent_image"].shape == (1, 4, 7, 8)
    # crop = the centre 64 x 56 px (offsets 3 and 2), exactly what VAEEncode of that crop gives
    with torch.inference_mode():
        (centre,) = nodes.VAEEncode().encode(vae, odd[:, 2:58, 3:67, :])
    torch.testing.assert_close(cropped[0][0][1]["concat_latent_image"], centre["samples"])
    assert not torch.allclose(resized[0][0][1]["concat_latent_image"], centre["samples"], atol=1e-3)
    with pytest.raises(ValueError, match="at least 8 px"):
        call("EditLabInstructPix2PixEncode", size_fit="crop", **{**kw, "image": odd[:, :5, :5]})


# -- the combiner -----------------------------------------------------------------------------------

def test_combiner_equals_comfyuis_dual_cfg_guider(ip2p, levels):
    """Same formula as ComfyUI's DualCFGGuider 'regular' with cfg_conds = s_T, cfg_cond2_negative = s_I."""
    import comfy_extras.nodes_custom_sampler as cs
    model = ip2p[0]
    both, image_only, neither, latent = levels
    sigmas = schedule(model)
    native = cs.DualCFGGuider().get_guider(model, both, image_only, neither, 7.5, 1.5, "regular")[0]
    ours = run_guider(combiner(model, levels), latent, sigmas)
    ref = run_guider(native, latent, sigmas)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_unit_scales_give_the_plain_conditional_prediction(ip2p, levels):
    import comfy_extras.nodes_custom_sampler as cs
    model = ip2p[0]
    both, _, neither, latent = levels
    sigmas = schedule(model)
    plain = cs.CFGGuider().get_guider(model, both, neither, 1.0)[0]
    torch.testing.assert_close(run_guider(combiner(model, levels, 1.0, 1.0), latent, sigmas),
                               run_guider(plain, latent, sigmas), rtol=1e-5, atol=1e-5)


def test_all_three_predictions_run_in_one_batched_forward_per_step(ip2p, levels):
    model = ip2p[0].clone()
    batches = []

    def wrapper(apply_model, args):
        batches.append(args["input"].shape[0])
        return apply_model(args["input"], args["timestep"], **args["c"])

    model.set_model_unet_function_wrapper(wrapper)
    sigmas = schedule(model, steps=3)
    run_guider(combiner(model, levels), levels[3], sigmas)
    assert batches == [3, 3, 3]
    batches.clear()  # s_I = 1 drops the 'neither' prediction; s_I = s_T = 1 keeps only 'both'
    run_guider(combiner(model, levels, 7.5, 1.0), levels[3], sigmas)
    run_guider(combiner(model, levels, 1.0, 1.0), levels[3], sigmas)
    assert batches == [2, 2, 2, 1, 1, 1]


def test_schedules_follow_the_sampling_run(ip2p, levels):
    """A linear schedule 9 -> 3 over 3 steps uses 9, 6, 3: the same as three constant runs stitched."""
    import comfy.samplers
    import comfy_extras.nodes_custom_sampler as cs
    model = ip2p[0]
    sigmas = schedule(model, steps=3)
    scheduled = run_guider(combiner(model, levels, 9.0, 2.0, "linear", 3.0, 1.0), levels[3], sigmas,
                           noise=cs.Noise_RandomNoise(3))
    # Step by step with constant guiders on the same sigmas (euler is memoryless across steps).
    x = None
    noise = cs.Noise_RandomNoise(3)
    for i, (s_t, s_i) in enumerate([(9.0, 2.0), (6.0, 1.5), (3.0, 1.0)]):
        latent = levels[3] if x is None else {"samples": x}
        x = run_guider(combiner(model, levels, s_t, s_i), latent, sigmas[i:i + 2],
                       noise=noise if i == 0 else cs.Noise_EmptyNoise())
    torch.testing.assert_close(scheduled, x, rtol=1e-4, atol=1e-4)
    constant = run_guider(combiner(model, levels, 9.0, 2.0), levels[3], sigmas, noise=cs.Noise_RandomNoise(3))
    assert not torch.allclose(scheduled, constant, atol=1e-3)
    assert comfy.samplers is not None


def test_rescale_changes_the_result_and_stays_finite(ip2p, levels):
    model = ip2p[0]
    sigmas = schedule(model)
    plain = run_guider(combiner(model, levels, 12.0, 1.5), levels[3], sigmas)
    rescaled = run_guider(combiner(model, levels, 12.0, 1.5, rescale=0.7), levels[3], sigmas)
    assert torch.isfinite(rescaled).all() and not torch.allclose(plain, rescaled, atol=1e-3)


def test_nodes_never_mutate_their_inputs(ip2p, photo, levels):
    model, clip, vae = ip2p
    before_photo = photo.clone()
    before = copy.deepcopy([[(t.clone(), dict(d)) for t, d in lvl] for lvl in levels[:3]])
    options = copy.deepcopy(model.model_options)
    call("EditLabInstructPix2PixEncode", clip=clip, vae=vae, image=photo, instruction="x", negative="",
         size_fit="resize")
    run_guider(combiner(model, levels, rescale=0.5, shape="cosine", extra_end=3.0), levels[3], schedule(model))
    assert torch.equal(photo, before_photo)
    for lvl, snap in zip(levels[:3], before):
        assert len(lvl) == len(snap)
        for (t, d), (t0, d0) in zip(lvl, snap):
            assert torch.equal(t, t0) and d.keys() == d0.keys()
            assert torch.equal(d["concat_latent_image"], d0["concat_latent_image"])
    assert model.model_options.keys() == options.keys()


# -- parity with the reference --------------------------------------------------------------------

@pytest.fixture(scope="module")
def diffusers_ip2p(ip2p_checkpoint, tmp_path_factory):
    import os
    import random_models
    from diffusers import EulerDiscreteScheduler, StableDiffusionInstructPix2PixPipeline
    out = random_models.checkpoint_to_diffusers(ip2p_checkpoint, tmp_path_factory.mktemp("ip2p") / "diffusers",
                                                os.environ["COMFYUI_PATH"])
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(str(out), local_files_only=True,
                                                                  safety_checker=None, requires_safety_checker=False)
    # 'trailing' spacing: integer timesteps 999, 749, ... = ComfyUI's 'simple' scheduler when steps divide 1000.
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def parity_run(engine, ip2p, diffusers_ip2p, steps: int, s_t: float, s_i: float) -> dict:
    """Our graph and the diffusers pipeline from the same initial noise; final latents and images."""
    import nodes
    from PIL import Image
    model, clip, vae = ip2p
    pipe = diffusers_ip2p
    photo = nodes.LoadImage().load_image("editlab_photo.png")[0]
    pil = Image.open(engine.root / "input" / "editlab_photo.png").convert("RGB")
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(42))

    with torch.inference_mode():
        ref = pipe(INSTRUCTION, image=pil, num_inference_steps=steps, guidance_scale=s_t, image_guidance_scale=s_i,
                   latents=z.clone(), output_type="latent").images  # scaled latents (x 0.18215)
        ref_image = (pipe.vae.decode(ref / pipe.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)

    levels = call("EditLabInstructPix2PixEncode", clip=clip, vae=vae, image=photo, instruction=INSTRUCTION,
                  negative="", size_fit="crop")
    sigmas = schedule(model, steps=steps, scheduler="simple")
    torch.testing.assert_close(sigmas, pipe.scheduler.sigmas.float(), rtol=1e-5, atol=1e-5)
    import comfy_extras.nodes_custom_sampler as cs
    # The same x_T = sigma_max * z: pass it pre-noised (unscaled LATENT convention) with noise disabled.
    start = {"samples": model.get_model_object("process_latent_out")(z * float(pipe.scheduler.init_noise_sigma))}
    ours = run_guider(combiner(model, levels, s_t, s_i), start, sigmas, "euler", cs.Noise_EmptyNoise())
    ours_scaled = model.get_model_object("process_latent_in")(ours)
    with torch.inference_mode():
        ours_image = nodes.VAEDecode().decode(vae, {"samples": ours})[0].movedim(-1, 1)
    err = float((ours_scaled - ref).abs().max())
    return {"max_abs": err, "rel": err / float(ref.abs().max()), "ref_absmax": float(ref.abs().max()),
            "image_max_abs": float((ours_image - ref_image).abs().max())}


def test_matches_diffusers_instruct_pix2pix_pipeline(engine, ip2p, diffusers_ip2p):
    """InstructPix2Pix Encode + Dual CFG Combiner + euler/simple == diffusers' pipeline + Euler (trailing)."""
    r = parity_run(engine, ip2p, diffusers_ip2p, steps=4, s_t=7.5, s_i=1.5)
    assert r["rel"] < PARITY_RTOL, r
    assert r["image_max_abs"] < 1e-4, r


# -- workflows and bad input ------------------------------------------------------------------------

@pytest.mark.parametrize("name", IP2P_WORKFLOWS)
def test_dual_cfg_workflows_run_end_to_end(engine, ip2p_checkpoint, name):
    from PIL import Image
    prompt = engine.prompt(name, **FAST)
    result = engine.run(prompt)
    samplers = ids_of(prompt, "SamplerCustomAdvanced")
    assert len(result.images) == len(samplers)
    for path in result.images:
        with Image.open(path) as im:
            assert im.size == (64, 64)
    outs = [result.node_output(nid)[0][0]["samples"] for nid in samplers]
    for latent in outs:
        assert latent.shape == (1, 4, 8, 8) and torch.isfinite(latent).all()
    if len(outs) > 1:  # the sweep: every (s_I, s_T) pair gives a different result
        flat = torch.stack([o.flatten() for o in outs])
        assert torch.cdist(flat, flat).add(torch.eye(len(outs)) * 1e9).min() > 1e-3


def test_non_ip2p_model_with_image_conditioning_names_the_expected_model_type(engine, sd15, levels, ip2p):
    assert_models_differ(sd15[0], ip2p[0], every_random_tensor=True)  # two seeds
    from editlab.headless.runner import RunError
    with pytest.raises(ValueError, match=r"SD15_instructpix2pix or SDXL_instructpix2pix"):
        combiner(sd15[0], levels)
    prompt = engine.prompt(IP2P_WORKFLOWS[0], **FAST)
    prompt[ids_of(prompt, "CheckpointLoaderSimple")[0]]["inputs"]["ckpt_name"] = engine.checkpoint
    with pytest.raises(RunError, match=r"EditLabDualCFGCombiner failed: .*model is BaseModel, not an "
                                       r"InstructPix2Pix model.*SD15_instructpix2pix"):
        engine.run(prompt)
    # The other way round: an IP2P model with plain text conditioning would ignore the photo.
    import nodes
    with torch.inference_mode():
        text = nodes.CLIPTextEncode().encode(ip2p[1], "x")[0]
    with pytest.raises(ValueError, match="InstructPix2Pix Encode"):
        call("EditLabDualCFGCombiner", model=ip2p[0], both=text, base_only=text, neither=text, extra_scale=7.5,
             base_scale=1.5, schedule="constant", extra_scale_end=7.5, base_scale_end=1.5, rescale=0.0)


def test_cfg_replacing_model_patches_are_refused_with_the_fix(ip2p, levels):
    import comfy_extras.nodes_model_advanced as adv
    patched = adv.RescaleCFG().patch(ip2p[0], 0.7)[0]
    with pytest.raises(ValueError, match="use this node's 'rescale' input"):
        combiner(patched, levels)


def test_sdxl_based_edit_model_works_with_the_combiner(engine, ip2p, photo):
    """An SDXL-family instruct-pix2pix model (tiny random UNet, ComfyUI class SDXL_instructpix2pix):
    the combiner accepts it and equals ComfyUI's DualCFGGuider on it."""
    import comfy_extras.nodes_custom_sampler as cs
    import random_models
    model = random_models.tiny_sdxl_model(seed=random_models.weight_seed(2), in_channels=8)
    assert type(model.model).__name__ == "SDXL_instructpix2pix"
    _, _, vae = ip2p
    with torch.inference_mode():
        image_latent = vae.encode(photo[:, :64, :64, :3])
    g = torch.Generator().manual_seed(3)
    text, empty = torch.randn(1, 77, 2048, generator=g), torch.randn(1, 77, 2048, generator=g)
    pooled = torch.randn(1, 1280, generator=g)
    both = [[text, {"pooled_output": pooled, "concat_latent_image": image_latent}]]
    image_only = [[empty, {"pooled_output": pooled, "concat_latent_image": image_latent}]]
    neither = [[empty, {"pooled_output": pooled, "concat_latent_image": torch.zeros_like(image_latent)}]]
    levels = (both, image_only, neither, {"samples": torch.zeros_like(image_latent)})
    sigmas = schedule(model)
    ours = run_guider(combiner(model, levels), levels[3], sigmas)
    native = run_guider(cs.DualCFGGuider().get_guider(model, both, image_only, neither, 7.5, 1.5, "regular")[0],
                        levels[3], sigmas)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, native, rtol=1e-4, atol=1e-4)


# -- model patches: pre-CFG functions are applied as ComfyUI's own sampling does -------------------

def test_pre_cfg_patches_are_applied_to_the_three_predictions(ip2p, levels):
    """A pre-CFG function sees [both, neither, base_only] with cond_scale = s_T, as ComfyUI passes a
    guider's predictions, and its output is what gets combined. By hand: a patch that replaces the 'both'
    prediction by 'base_only' removes the instruction term, i.e. equals s_T = 0 without the patch; at
    s_I = s_T = 1 it equals the plain 'image only' prediction (no prediction may be skipped then)."""
    import comfy_extras.nodes_custom_sampler as cs
    model = ip2p[0]
    both, image_only, neither, latent = levels
    sigmas = schedule(model)
    seen = []

    def drop_instruction(args):
        out = args["conds_out"]
        seen.append((len(out), args["cond_scale"], [c is None for c in args["conds"]]))
        return [out[2], out[1], out[2]]

    patched = model.clone()
    patched.set_model_sampler_pre_cfg_function(drop_instruction)
    ours = run_guider(combiner(patched, levels, 7.5, 1.5), latent, sigmas)
    assert seen and all(s == (3, 7.5, [False, False, False]) for s in seen)
    by_hand = run_guider(combiner(model, levels, 0.0, 1.5), latent, sigmas)
    torch.testing.assert_close(ours, by_hand, rtol=1e-4, atol=1e-4)  # batch-composition round-off
    assert not torch.allclose(ours, run_guider(combiner(model, levels, 7.5, 1.5), latent, sigmas), atol=1e-3)
    unit = run_guider(combiner(patched, levels, 1.0, 1.0), latent, sigmas)
    plain_image_only = run_guider(cs.CFGGuider().get_guider(model, image_only, neither, 1.0)[0], latent, sigmas)
    torch.testing.assert_close(unit, plain_image_only, rtol=1e-4, atol=1e-4)


def test_comfyuis_apg_patch_changes_the_dual_cfg_result(ip2p, levels):
    """ComfyUI's APG node (a pre-CFG patch) is no longer skipped silently."""
    import comfy_extras.nodes_apg as apg
    model = ip2p[0]
    sigmas = schedule(model)
    patched = apg.APG.execute(model, eta=0.0, norm_threshold=0.0, momentum=0.0).result[0]
    plain = run_guider(combiner(model, levels), levels[3], sigmas)
    with_apg = run_guider(combiner(patched, levels), levels[3], sigmas)
    assert torch.isfinite(with_apg).all() and not torch.allclose(plain, with_apg, atol=1e-3)
