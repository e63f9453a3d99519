"""SDEdit / GLIDE-style inpainting on the real ComfyUI engine with a random SD1.5-architecture checkpoint."""
from __future__ import annotations

import asyncio
import copy
import logging
from pathlib import Path

import pytest
import torch
from engine_calls import call

ROOT = Path(__file__).resolve().parents[2]
FAST = {"steps": 3, "max_runs": 3}


def ids_of(prompt: dict, class_type: str) -> list[str]:
    return [k for k, v in prompt.items() if v["class_type"] == class_type]


# -- registration ---------------------------------------------------------------------------------

def test_pack_loads_through_comfyuis_loader_with_every_node_documented(engine, caplog):
    import nodes
    from editlab.headless.runner import PACK_DIR
    with caplog.at_level(logging.WARNING):
        assert asyncio.run(nodes.load_custom_node(PACK_DIR)) is True
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    info = engine.runner.object_info()
    ours = [k for k, v in info.items() if str(v.get("category", "")).startswith("EditLab")]
    expected = {"EditLabSDEPerturb", "EditLabReverseSDESampler", "EditLabKnownRegionSampler", "EditLabSDEditT0Search"}
    assert expected <= set(ours)
    for node_id in ours:
        assert node_id.startswith("EditLab"), node_id
        assert info[node_id]["description"], f"{node_id} has no description"
        for section in ("required", "optional"):
            for name, spec in info[node_id]["input"].get(section, {}).items():
                if spec[0] in ("MODEL", "CONDITIONING", "CLIP", "VAE") and name in ("model", "positive", "negative"):
                    continue  # self-explanatory sockets
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"


# -- method properties on the engine -----------------------------------------------------------------

@pytest.fixture(scope="module")
def guide(engine, sd15):
    import nodes
    _, _, vae = sd15
    img = nodes.LoadImage().load_image("editlab_photo.png")
    with torch.inference_mode():
        (latent,) = nodes.VAEEncode().encode(vae, img[0])
    return {"samples": latent["samples"].clone()}, img[1]


@pytest.fixture(scope="module")
def conds(sd15):
    import nodes
    _, clip, _ = sd15
    enc = nodes.CLIPTextEncode()
    with torch.inference_mode():
        return enc.encode(clip, "a red boat")[0], enc.encode(clip, "")[0]


def sample(model, conds, noise, sampler, sigmas, latent, cfg=5.0):
    import comfy_extras.nodes_custom_sampler as cs
    guider = cs.CFGGuider().get_guider(model, conds[0], conds[1], cfg)[0]
    with torch.inference_mode():
        out = cs.SamplerCustomAdvanced().sample(noise, guider, sampler, sigmas, latent)
    return out[0]["samples"]


def test_perturb_with_noise_disabled_equals_comfyuis_own_noising(sd15, guide, conds):
    """SDE Perturb's x(t0) is exactly what RandomNoise(seed) + the same sigmas produce natively."""
    import comfy.samplers
    import comfy_extras.nodes_custom_sampler as cs
    model = sd15[0]
    noised, sigmas = call("EditLabSDEPerturb", model=model, latent=guide[0], t0=0.5, steps=4,
                          scheduler="normal", seed=123)
    ms = model.get_model_object("model_sampling")
    assert float(sigmas[0]) == pytest.approx(float(ms.sigma(torch.tensor(0.5 * 999))), rel=1e-5)
    assert float(sigmas[-1]) == 0.0 and len(sigmas) == 5
    euler = comfy.samplers.sampler_object("euler")
    ours = sample(model, conds, cs.Noise_EmptyNoise(), euler, sigmas, noised)
    native = sample(model, conds, cs.Noise_RandomNoise(123), euler, sigmas, guide[0])
    torch.testing.assert_close(ours, native, rtol=1e-4, atol=1e-4)


def test_reverse_sde_sampler_is_seeded_and_modes_differ(sd15, guide, conds):
    import comfy_extras.nodes_custom_sampler as cs
    model = sd15[0]
    noised, sigmas = call("EditLabSDEPerturb", model=model, latent=guide[0], t0=0.6, steps=4,
                          scheduler="normal", seed=1)
    runs = {}
    for mode, seed in [("stochastic", 5), ("stochastic", 5), ("stochastic", 6), ("deterministic", 5)]:
        (sampler,) = call("EditLabReverseSDESampler", mode=mode, seed=seed, repeat=1)
        runs.setdefault((mode, seed), []).append(sample(model, conds, cs.Noise_EmptyNoise(), sampler, sigmas, noised))
    a, b = runs[("stochastic", 5)]
    assert torch.equal(a, b)
    assert not torch.allclose(a, runs[("stochastic", 6)][0])
    assert not torch.allclose(a, runs[("deterministic", 5)][0])


@pytest.mark.parametrize("known_noise,replace_on", [("same", "x_t"), ("fresh", "both"), ("fresh", "x0")])
def test_known_region_sampler_keeps_the_guide_outside_the_mask(sd15, guide, conds, known_noise, replace_on):
    import comfy.samplers
    import comfy_extras.nodes_custom_sampler as cs
    model = sd15[0]
    latent, mask = guide
    noised, sigmas = call("EditLabSDEPerturb", model=model, latent=latent, t0=0.7, steps=4,
                          scheduler="normal", seed=2)
    (inner,) = call("EditLabReverseSDESampler", mode="stochastic", seed=3, repeat=1)
    for base, noise, lat in [(inner, cs.Noise_EmptyNoise(), noised),
                             (comfy.samplers.sampler_object("euler_ancestral"), cs.Noise_RandomNoise(4), latent)]:
        (sampler,) = call("EditLabKnownRegionSampler", sampler=base, mask_convention="1 = regenerate (ComfyUI)",
                          known_noise=known_noise, replace_on=replace_on, seed=9, mask=mask, guide=latent)
        out = sample(model, conds, noise, sampler, sigmas, lat)
        keep = torch.nn.functional.interpolate(mask[None], size=out.shape[-2:], mode="bilinear")[0] == 0
        keep = keep.expand_as(out[0])[None]
        assert torch.allclose(out[keep], latent["samples"][keep], atol=1e-5)
        assert not torch.allclose(out[~keep], latent["samples"][~keep], atol=1e-2)


def test_nodes_never_mutate_their_inputs(sd15, guide, conds):
    import comfy_extras.nodes_custom_sampler as cs
    model = sd15[0]
    options_before = copy.deepcopy(model.model_options)
    patches_before = dict(model.patches)
    weight = next(iter(model.model.diffusion_model.parameters())).detach().clone()
    latent = {"samples": guide[0]["samples"].clone()}
    snapshot = latent["samples"].clone()
    noised, sigmas = call("EditLabSDEPerturb", model=model, latent=latent, t0=0.5, steps=3, scheduler="normal", seed=0)
    (inner,) = call("EditLabReverseSDESampler", mode="stochastic", seed=0, repeat=2)
    (sampler,) = call("EditLabKnownRegionSampler", sampler=inner, mask_convention="1 = keep (GLIDE)",
                      known_noise="fresh", replace_on="both", seed=0, mask=guide[1], guide=latent)
    sample(model, conds, cs.Noise_EmptyNoise(), sampler, sigmas, noised)
    call("EditLabSDEditT0Search", model=model, positive=conds[0], negative=conds[1], sampler=inner, guide=latent,
         budget=0.5, cfg=5.0, steps=2, scheduler="normal", seed=0, max_runs=2, t0_min=0.2, t0_max=0.8)
    assert torch.equal(latent["samples"], snapshot) and set(latent) == {"samples"}
    assert model.model_options.keys() == options_before.keys()
    assert model.model_options.get("transformer_options", {}).keys() == options_before.get("transformer_options", {}).keys()
    assert dict(model.patches) == patches_before
    assert torch.equal(next(iter(model.model.diffusion_model.parameters())).detach(), weight)


def test_t0_search_result_is_the_perturb_and_sample_result_at_the_chosen_t0(sd15, guide, conds):
    import comfy_extras.nodes_custom_sampler as cs
    model = sd15[0]
    (inner,) = call("EditLabReverseSDESampler", mode="deterministic", seed=0, repeat=1)
    kw = dict(model=model, positive=conds[0], negative=conds[1], sampler=inner, guide=guide[0], cfg=5.0, steps=3,
              scheduler="normal", seed=7, max_runs=5, t0_min=0.1, t0_max=1.0)
    result, t0, dist = call("EditLabSDEditT0Search", budget=1e6, **kw)
    assert t0 == 1.0  # everything is within a huge budget: the most realistic t0
    # A budget between the extremes gives an interior t0 within budget, reproducible by hand.
    _, _, d_hi = call("EditLabSDEditT0Search", budget=1e-9, **{**kw, "max_runs": 2, "t0_min": 0.1})
    result, t0, dist = call("EditLabSDEditT0Search", budget=dist * 0.5 + 1e-6, **kw)
    assert 0.1 <= t0 <= 1.0
    noised, sigmas = call("EditLabSDEPerturb", model=model, latent=guide[0], t0=t0, steps=3, scheduler="normal", seed=7)
    again = sample(model, conds, cs.Noise_EmptyNoise(), inner, sigmas, noised)
    torch.testing.assert_close(result["samples"], again, rtol=1e-4, atol=1e-4)


# -- bad input -----------------------------------------------------------------------------------

def test_bad_inputs_fail_with_clear_messages(engine, sd15, guide, conds):
    from editlab.headless.runner import RunError
    model = sd15[0]
    with pytest.raises(ValueError, match="noise_mask"):
        call("EditLabSDEPerturb", model=model, latent={**guide[0], "noise_mask": guide[1]}, t0=0.5, steps=3,
             scheduler="normal", seed=0)
    with pytest.raises(ValueError, match="t0_min"):
        call("EditLabSDEditT0Search", model=model, positive=conds[0], negative=conds[1], sampler=None, guide=guide[0],
             budget=0.1, cfg=5.0, steps=2, scheduler="normal", seed=0, max_runs=2, t0_min=0.8, t0_max=0.2)
    # A mask of the wrong size, through the whole engine: one clear line naming the node and the fix.
    prompt = engine.prompt("SDEdit - masked stroke edit of a photo", **FAST)
    load = ids_of(prompt, "LoadImage")[0]
    prompt["999"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 40, "height": 24}}
    prompt[ids_of(prompt, "EditLabKnownRegionSampler")[0]]["inputs"]["mask"] = ["999", 0]
    with pytest.raises(RunError, match=r"EditLabKnownRegionSampler failed: .*mask is 40x24 px"):
        engine.run(prompt)
    # A missing checkpoint: ComfyUI's validator names the file.
    prompt = engine.prompt("SDEdit - stroke painting to image", **FAST)
    prompt[ids_of(prompt, "CheckpointLoaderSimple")[0]]["inputs"]["ckpt_name"] = "missing.safetensors"
    with pytest.raises(RunError, match=r"missing.safetensors.*searched .*checkpoints"):
        engine.run(prompt)
    assert load  # the photo loader exists in the masked workflow


# -- flow-matching sampling (issue 16: SD3 / Flux) --------------------------------------------------
# These nodes used to refuse a flow model; they now follow the model's family (docs/methods.md §11). The
# SD1.5 test model given rectified-flow sampling (ComfyUI's ModelSamplingSD3) is a flow model to them.

@pytest.fixture()
def flow(sd15):
    """The SD1.5 test model given rectified-flow sampling (ComfyUI's ModelSamplingSD3), recording UNet inputs."""
    import comfy_extras.nodes_model_advanced as adv
    from editlab.nodes.common import is_k_space, model_family
    from editlab.samplers.family import FLOW, K_SPACE
    model = adv.ModelSamplingSD3().patch(sd15[0], 3.0)[0]
    assert is_k_space(sd15[0].get_model_object("model_sampling")) and model_family(sd15[0]) == K_SPACE
    assert not is_k_space(model.get_model_object("model_sampling")) and model_family(model) == FLOW
    calls = []

    def wrapper(apply_model, args):
        calls.append(args["input"].detach().clone())
        return apply_model(args["input"], args["timestep"], **args["c"])

    model.set_model_unet_function_wrapper(wrapper)
    return model, calls


def test_known_region_and_reverse_sde_samplers_follow_flow_sampling(flow, guide, conds):
    import comfy.sample
    import comfy.samplers
    import comfy_extras.nodes_custom_sampler as cs
    model, calls = flow
    latent, mask = guide
    sigmas = cs.BasicScheduler().get_sigmas(model, "simple", 3, 1.0)[0]
    (known,) = call("EditLabKnownRegionSampler", sampler=comfy.samplers.sampler_object("euler"),
                    mask_convention="1 = regenerate (ComfyUI)", known_noise="same", replace_on="x_t", seed=0,
                    mask=mask, guide=latent)
    out = sample(model, conds, cs.Noise_RandomNoise(0), known, sigmas, latent)
    keep = torch.nn.functional.interpolate(mask[None], size=out.shape[-2:], mode="bilinear")[0] == 0
    keep = keep.expand_as(out[0])[None]
    assert torch.allclose(out[keep], latent["samples"][keep], atol=1e-5)
    # the kept region entering the second evaluation is the flow marginal (1 - s) g + s z, not g + s z
    g = model.model.process_latent_in(latent["samples"])
    z = comfy.sample.prepare_noise(latent["samples"], 0)
    s1 = float(sigmas[1])
    torch.testing.assert_close(calls[1][:1][keep], ((1 - s1) * g + s1 * z)[keep], rtol=1e-4, atol=1e-4)
    (reverse,) = call("EditLabReverseSDESampler", mode="deterministic", seed=0, repeat=1)
    ours = sample(model, conds, cs.Noise_RandomNoise(0), reverse, sigmas, latent)
    native = sample(model, conds, cs.Noise_RandomNoise(0), comfy.samplers.sampler_object("euler"), sigmas, latent)
    torch.testing.assert_close(ours, native, rtol=1e-4, atol=1e-4)  # deterministic on flow = the flow ODE's Euler


def test_perturb_and_t0_search_follow_flow_sampling(flow, guide, conds):
    import comfy.samplers
    import comfy_extras.nodes_custom_sampler as cs
    model, _ = flow
    noised, sigmas = call("EditLabSDEPerturb", model=model, latent=guide[0], t0=0.5, steps=3, scheduler="normal", seed=0)
    euler = comfy.samplers.sampler_object("euler")
    ours = sample(model, conds, cs.Noise_EmptyNoise(), euler, sigmas, noised)
    native = sample(model, conds, cs.Noise_RandomNoise(0), euler, sigmas, guide[0])
    torch.testing.assert_close(ours, native, rtol=1e-4, atol=1e-4)
    (inner,) = call("EditLabReverseSDESampler", mode="deterministic", seed=0, repeat=1)
    result, t0, _ = call("EditLabSDEditT0Search", model=model, positive=conds[0], negative=conds[1], sampler=inner,
                         guide=guide[0], budget=1e6, cfg=5.0, steps=2, scheduler="normal", seed=0, max_runs=2,
                         t0_min=0.2, t0_max=0.8)
    assert t0 == 0.8
    noised, sigmas = call("EditLabSDEPerturb", model=model, latent=guide[0], t0=t0, steps=2, scheduler="normal", seed=0)
    again = sample(model, conds, cs.Noise_EmptyNoise(), inner, sigmas, noised)
    torch.testing.assert_close(result["samples"], again, rtol=1e-4, atol=1e-4)


# -- choices reaching execute through a link (or an unchecked API prompt) are refused ----------------

def test_unknown_choices_are_refused_at_execute_instead_of_falling_back(sd15, guide, conds):
    import comfy.samplers
    latent, mask = guide
    with pytest.raises(ValueError, match=r"mode: 'Deterministic' is not one of \['stochastic', 'deterministic'\]"):
        call("EditLabReverseSDESampler", mode="Deterministic", seed=0, repeat=1)
    euler = comfy.samplers.sampler_object("euler")
    good = dict(sampler=euler, mask_convention="1 = keep (GLIDE)", known_noise="fresh", replace_on="both", seed=0,
                mask=mask, guide=latent)
    for name, bad in (("mask_convention", "1 = keep"), ("known_noise", "new"), ("replace_on", "x")):
        with pytest.raises(ValueError, match=rf"{name}: {bad!r} is not one of"):
            call("EditLabKnownRegionSampler", **{**good, name: bad})
    (inner,) = call("EditLabReverseSDESampler", mode="stochastic", seed=0, repeat=1)
    with pytest.raises(ValueError, match=r"scheduler: 'cosine' is not one of"):
        call("EditLabSDEditT0Search", model=sd15[0], positive=conds[0], negative=conds[1], sampler=inner,
             guide=latent, budget=0.1, cfg=5.0, steps=2, scheduler="cosine", seed=0, max_runs=2, t0_min=0.2,
             t0_max=0.8)


# -- progress over repeat rounds ----------------------------------------------------------------------

def test_repeat_rounds_count_on_comfyuis_progress_bar(sd15, guide, conds, monkeypatch):
    """With repeat = 2 and 3 steps the bar runs 1..6 of 6 (previews included), never back to the start."""
    import comfy.utils
    import comfy_extras.nodes_custom_sampler as cs
    model = sd15[0]
    seen = []
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", lambda value, total, preview, node_id=None: seen.append((value, total)))
    noised, sigmas = call("EditLabSDEPerturb", model=model, latent=guide[0], t0=0.5, steps=3, scheduler="normal", seed=0)
    (sampler,) = call("EditLabReverseSDESampler", mode="stochastic", seed=0, repeat=2)
    sample(model, conds, cs.Noise_EmptyNoise(), sampler, sigmas, noised)
    assert seen == [(i, 6) for i in range(1, 7)], seen
