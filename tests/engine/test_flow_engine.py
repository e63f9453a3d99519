"""EditLab's nodes on flow-matching models (SD3.x, Flux), on the real engine (docs/methods.md §11).

Tiny random SD3-architecture (MMDiT) and Flux-architecture models that ComfyUI's own detection recognises
(``tests/support/flow_models.py``): SD3 (flow, real CFG), Flux-dev-like (guidance-distilled: no
unconditional branch) and Flux-schnell-like (flow, no guidance embedding). Every expected value is computed
here from the family's formula or from ComfyUI's native path, never from the node under test.
"""
from __future__ import annotations

import pytest
import torch
from engine_calls import call

KINDS = ["sd3", "flux-dev", "flux-schnell"]


def sample(model, pos, neg, noise, sampler, sigmas, latent, cfg):
    import comfy_extras.nodes_custom_sampler as cs
    guider = cs.CFGGuider().get_guider(model, pos, neg, cfg)[0]
    with torch.inference_mode():
        return cs.SamplerCustomAdvanced().sample(noise, guider, sampler, sigmas, latent)[0]["samples"]


def run_guider(guider, noise, sampler, sigmas, latent):
    import comfy_extras.nodes_custom_sampler as cs
    with torch.inference_mode():
        return cs.SamplerCustomAdvanced().sample(noise, guider, sampler, sigmas, latent)[0]["samples"]


@pytest.fixture(scope="module")
def flow(engine):
    """{kind: (model, positive, negative, latent, cfg)} for the three tiny flow models."""
    import flow_models as fm
    import random_models
    seed = random_models.weight_seed()
    out = {
        "sd3": (fm.tiny_sd3_model(seed), fm.sd3_conditioning(1), fm.sd3_conditioning(2), 3.0),
        "flux-dev": (fm.tiny_flux_model(seed), fm.flux_conditioning(1), fm.flux_conditioning(2), 1.0),
        "flux-schnell": (fm.tiny_flux_model(seed, guidance_embed=False), fm.flux_conditioning(1, guidance=None),
                         fm.flux_conditioning(2, guidance=None), 3.0),
    }
    latent = fm.flow_latent(3)
    return {k: (m, p, n, latent, cfg) for k, (m, p, n, cfg) in out.items()}


def counting(model):
    """A clone of ``model`` that records every network evaluation's input."""
    calls = []
    m = model.clone()

    def wrapper(apply_model, args):
        calls.append((float(args["timestep"].flatten()[0]), args["input"].detach().clone()))
        return apply_model(args["input"], args["timestep"], **args["c"])

    m.set_model_unet_function_wrapper(wrapper)
    return m, calls


def test_comfyuis_detection_gives_the_three_families(flow):
    import comfy.model_base
    import comfy.model_sampling
    from editlab.nodes.common import model_family
    from editlab.samplers import family as fam
    want = {"sd3": (comfy.model_base.SD3, fam.FLOW), "flux-dev": (comfy.model_base.Flux, fam.FLOW_DISTILLED),
            "flux-schnell": (comfy.model_base.Flux, fam.FLOW)}
    for kind, (cls, family) in want.items():
        model = flow[kind][0]
        assert type(model.model) is cls
        assert isinstance(model.get_model_object("model_sampling"), comfy.model_sampling.CONST)
        assert model_family(model) == family, kind
    # dev and schnell are different networks (the guidance embedding is the difference that matters here)
    assert any(k.startswith("guidance_in.") for k in flow["flux-dev"][0].model.diffusion_model.state_dict())
    assert not any(k.startswith("guidance_in.") for k in flow["flux-schnell"][0].model.diffusion_model.state_dict())


# -- SDEdit -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_sdedit_perturbation_is_the_flow_marginal_and_matches_native_noising(flow, kind):
    import comfy.sample
    import comfy.samplers
    import comfy_extras.nodes_custom_sampler as cs
    model, pos, neg, latent, cfg = flow[kind]
    noised, sigmas = call("EditLabSDEPerturb", model=model, latent=latent, t0=0.6, steps=3, scheduler="simple", seed=3)
    s0 = float(sigmas[0])
    assert 0.0 < s0 < 1.0
    # What a sampler with noise disabled starts from: (1 - s0) * latent_in = (1 - s0) x0 + s0 z.
    base = model.model
    z = comfy.sample.prepare_noise(latent["samples"], 3)
    x0 = base.process_latent_in(latent["samples"])
    start = (1.0 - s0) * base.process_latent_in(noised["samples"])
    torch.testing.assert_close(start, (1.0 - s0) * x0 + s0 * z, rtol=1e-5, atol=1e-5)
    euler = comfy.samplers.sampler_object("euler")
    ours = sample(model, pos, neg, cs.Noise_EmptyNoise(), euler, sigmas, noised, cfg)
    native = sample(model, pos, neg, cs.Noise_RandomNoise(3), euler, sigmas, latent, cfg)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, native, rtol=1e-4, atol=1e-4)


def test_t0_1_is_capped_below_pure_noise_so_the_guide_survives(flow):
    from editlab.samplers.family import FLOW_SIGMA_CAP
    model, _, _, latent, _ = flow["sd3"]
    noised, sigmas = call("EditLabSDEPerturb", model=model, latent=latent, t0=1.0, steps=3, scheduler="simple", seed=3)
    assert float(sigmas[0]) == pytest.approx(FLOW_SIGMA_CAP)
    assert torch.isfinite(noised["samples"]).all()


@pytest.mark.parametrize("kind", ["sd3", "flux-dev"])
def test_reverse_sde_sampler_on_flow(flow, kind):
    import comfy.samplers
    import comfy_extras.nodes_custom_sampler as cs
    model, pos, neg, latent, cfg = flow[kind]
    noised, sigmas = call("EditLabSDEPerturb", model=model, latent=latent, t0=0.7, steps=4, scheduler="simple", seed=1)
    (det,) = call("EditLabReverseSDESampler", mode="deterministic", seed=0, repeat=1)
    ours = sample(model, pos, neg, cs.Noise_EmptyNoise(), det, sigmas, noised, cfg)
    # deterministic on flow = the Euler step of the flow ODE, i.e. ComfyUI's own euler sampler
    euler = sample(model, pos, neg, cs.Noise_EmptyNoise(), comfy.samplers.sampler_object("euler"), sigmas, noised, cfg)
    torch.testing.assert_close(ours, euler, rtol=1e-4, atol=1e-4)
    (sto,) = call("EditLabReverseSDESampler", mode="stochastic", seed=5, repeat=2)
    a = sample(model, pos, neg, cs.Noise_EmptyNoise(), sto, sigmas, noised, cfg)
    b = sample(model, pos, neg, cs.Noise_EmptyNoise(), sto, sigmas, noised, cfg)
    assert torch.isfinite(a).all() and torch.equal(a, b)  # seeded
    assert not torch.allclose(a, ours, atol=1e-3)          # and stochastic


@pytest.mark.parametrize("known_noise", ["same", "fresh"])
@pytest.mark.parametrize("kind", ["sd3", "flux-dev"])
def test_known_region_is_renoised_on_the_flow_marginal_and_kept_exactly(flow, kind, known_noise):
    import comfy.sample
    import comfy.samplers
    import comfy_extras.nodes_custom_sampler as cs
    model, pos, neg, latent, cfg = flow[kind]
    counted, calls = counting(model)
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 16:48] = 1.0
    noised, sigmas = call("EditLabSDEPerturb", model=model, latent=latent, t0=0.8, steps=3, scheduler="simple", seed=4)
    (known,) = call("EditLabKnownRegionSampler", sampler=comfy.samplers.sampler_object("euler"),
                    mask_convention="1 = regenerate (ComfyUI)", known_noise=known_noise, replace_on="x_t", seed=0,
                    mask=mask, guide=latent)
    out = sample(counted, pos, neg, cs.Noise_EmptyNoise(), known, sigmas, noised, cfg)
    keep = torch.ones_like(out, dtype=torch.bool)
    keep[..., 2:6, 2:6] = False
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[keep], latent["samples"][keep], rtol=0, atol=1e-5)
    assert not torch.allclose(out[~keep], latent["samples"][~keep], atol=1e-3)
    # Before every evaluation the kept region is (1 - sigma) guide + sigma z (the flow marginal, never the
    # k-space guide + sigma z); with 'same' z is the perturbation's own draw.
    g = model.model.process_latent_in(latent["samples"])
    z = comfy.sample.prepare_noise(latent["samples"], 4)
    levels = sigmas.tolist()[:-1]
    assert len(calls) == len(levels)  # one (batched) evaluation per step: calls[i] is at sigmas[i]
    for (_, x), s in zip(calls, levels):
        region = x[:1][keep[:1]]
        if known_noise == "same":
            torch.testing.assert_close(region, ((1.0 - s) * g + s * z)[keep[:1]], rtol=1e-4, atol=1e-4)
        else:  # a fresh draw: the clean part is (1 - sigma) guide, the rest unit-variance noise of size sigma
            resid = (region - (1.0 - s) * g[keep[:1]]) / s
            assert abs(float(resid.std()) - 1.0) < 0.25, (s, float(resid.std()))


# -- inversion ----------------------------------------------------------------------------------------

def _invert(model, pos, latent, steps, scheduler="simple"):
    return call("EditLabDDIMInvert", model=model, positive=pos, latent=latent, steps=steps, scheduler=scheduler,
                guidance=1.0, input_scaling="reference")


@pytest.mark.parametrize("kind", KINDS)
def test_direct_inversion_reconstructs_exactly(flow, kind):
    import comfy.samplers
    import comfy_extras.nodes_custom_sampler as cs
    from editlab.samplers.inversion import psnr
    model, pos, neg, latent, cfg = flow[kind]
    inv, noise, sigmas = _invert(model, pos, latent, 4)
    assert inv.meta["family"] and torch.isfinite(noise["samples"]).all()
    (g,) = call("EditLabInversionGuider", model=model, inversion=inv, positive=pos, negative=neg, cfg=cfg,
                mode="direct", check_model=True)
    out = run_guider(g, cs.Noise_EmptyNoise(), comfy.samplers.sampler_object("euler"), sigmas, noise)
    assert psnr(out, latent["samples"]) > 90


@pytest.mark.parametrize("kind", ["sd3", "flux-dev"])
def test_ddim_inversion_round_trip_error_is_small_and_shrinks_with_steps(flow, kind):
    import comfy.samplers
    import comfy_extras.nodes_custom_sampler as cs
    from editlab.samplers.inversion import psnr
    model, pos, neg, latent, _ = flow[kind]
    results = {}
    for steps in (4, 32):
        inv, noise, sigmas = _invert(model, pos, latent, steps)
        (g,) = call("EditLabInversionGuider", model=model, inversion=inv, positive=pos, negative=neg, cfg=1.0,
                    mode="plain", check_model=True)
        out = run_guider(g, cs.Noise_EmptyNoise(), comfy.samplers.sampler_object("euler"), sigmas, noise)
        results[steps] = psnr(out, latent["samples"])
    assert results[32] > results[4] + 6, results  # first order: 8x the steps, well over 6 dB
    assert results[32] > 25, results


def test_a_tail_of_a_flow_inversion_starts_from_the_pivot(flow):
    import comfy.samplers
    import comfy_extras.nodes_custom_sampler as cs
    from editlab.samplers.inversion import psnr
    model, pos, neg, latent, cfg = flow["sd3"]
    inv, noise, sigmas = _invert(model, pos, latent, 4)
    (g,) = call("EditLabInversionGuider", model=model, inversion=inv, positive=pos, negative=neg, cfg=cfg,
                mode="direct", check_model=True)
    out = run_guider(g, cs.Noise_EmptyNoise(), comfy.samplers.sampler_object("euler"), sigmas[2:], noise)
    assert psnr(out, latent["samples"]) > 90


def test_null_text_and_negative_prompt_on_sd3(flow):
    import comfy.samplers
    import comfy_extras.nodes_custom_sampler as cs
    from editlab.samplers.inversion import psnr
    model, pos, neg, latent, _ = flow["sd3"]
    inv, noise, sigmas = _invert(model, pos, latent, 4)
    (tuned,) = call("EditLabNullTextOptimize", model=model, inversion=inv, negative=neg, guidance=4.0, inner_steps=5,
                    early_stop=1e-7, early_stop_slope=0.0, learning_rate=1e-1, check_model=True)
    results = {}
    for mode, which in (("null-text", tuned), ("negative-prompt", inv), ("plain", inv)):
        (g,) = call("EditLabInversionGuider", model=model, inversion=which, positive=pos, negative=neg, cfg=4.0,
                    mode=mode, check_model=True)
        out = run_guider(g, cs.Noise_EmptyNoise(), comfy.samplers.sampler_object("euler"), sigmas, noise)
        assert torch.isfinite(out).all()
        results[mode] = psnr(out, latent["samples"])
    assert results["null-text"] > results["plain"], results


def test_an_inversion_is_refused_under_another_parametrisation(flow, sd15):
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3
    model, pos, neg, latent, _ = flow["sd3"]
    inv, _, _ = _invert(model, pos, latent, 2)
    with torch.inference_mode():
        (as_k,) = ModelSamplingSD3().patch(model, shift=3.0)
    inv.meta["family"] = "k-space (eps / v-prediction)"  # an inversion made before a ModelSampling patch
    with pytest.raises(ValueError, match=r"made with a k-space .* model.*flow-matching"):
        call("EditLabInversionGuider", model=as_k, inversion=inv, positive=pos, negative=neg, cfg=1.0,
             mode="direct", check_model=False)


# -- what does not apply is refused, naming the model, before any work -------------------------------

def test_methods_without_an_unconditional_branch_are_refused_on_guidance_distilled_flux(flow, monkeypatch):
    import comfy.samplers
    model, pos, neg, latent, _ = flow["flux-dev"]
    inv, _, _ = _invert(model, pos, latent, 2)

    def no_sampling(*_a, **_k):
        raise AssertionError("sampling started")
    monkeypatch.setattr(comfy.samplers.CFGGuider, "sample", no_sampling)
    refused = r"{}.*\(Flux, model sampling ModelSamplingFlux/CONST\) is guidance-distilled .*no unconditional branch"
    with pytest.raises(ValueError, match=refused.format("Null-Text Optimize")):
        call("EditLabNullTextOptimize", model=model, inversion=inv, negative=neg, guidance=3.5, inner_steps=1,
             early_stop=1e-5, early_stop_slope=2e-5, learning_rate=1e-2, check_model=True)
    for mode in ("null-text", "negative-prompt"):
        with pytest.raises(ValueError, match=refused.format(f"Inversion Guider \\(mode '{mode}'\\)")):
            call("EditLabInversionGuider", model=model, inversion=inv, positive=pos, negative=neg, cfg=3.5,
                 mode=mode, check_model=True)
    with pytest.raises(ValueError, match=refused.format("DDIM Invert")):
        call("EditLabDDIMInvert", model=model, positive=pos, latent=latent, steps=2, scheduler="simple",
             guidance=3.5, input_scaling="reference", negative=neg)
    with pytest.raises(ValueError, match=r"input_scaling 'k-space' is the eps-model"):
        call("EditLabDDIMInvert", model=model, positive=pos, latent=latent, steps=2, scheduler="simple",
             guidance=1.0, input_scaling="k-space")


def test_dual_cfg_is_refused_on_guidance_distilled_flux(flow):
    """Regression: before, the combiner built a guider for Flux-dev and sampled a meaningless 'neither' branch."""
    model, pos, neg, _, _ = flow["flux-dev"]
    with pytest.raises(ValueError, match=r"Dual CFG Combiner: the model \(Flux, .*\) is guidance-distilled"):
        call("EditLabDualCFGCombiner", model=model, both=pos, base_only=neg, neither=neg, extra_scale=7.5,
             base_scale=1.5, schedule="constant", extra_scale_end=7.5, base_scale_end=1.5, rescale=0.0)
    # schnell (no guidance embedding) keeps real CFG: the combiner is built
    m2, p2, n2, _, _ = flow["flux-schnell"]
    (g,) = call("EditLabDualCFGCombiner", model=m2, both=p2, base_only=n2, neither=n2, extra_scale=7.5,
                base_scale=1.5, schedule="constant", extra_scale_end=7.5, base_scale_end=1.5, rescale=0.0)
    assert g is not None


def test_dual_cfg_works_on_flow_models_with_cfg(flow):
    import comfy.samplers
    import comfy_extras.nodes_custom_sampler as cs
    model, pos, neg, latent, _ = flow["sd3"]
    sigmas = cs.BasicScheduler().get_sigmas(model, "simple", 3, 1.0)[0]
    euler = comfy.samplers.sampler_object("euler")
    (g,) = call("EditLabDualCFGCombiner", model=model, both=pos, base_only=neg, neither=neg, extra_scale=1.0,
                base_scale=1.0, schedule="constant", extra_scale_end=1.0, base_scale_end=1.0, rescale=0.0)
    unit = run_guider(g, cs.Noise_RandomNoise(2), euler, sigmas, latent)
    plain = sample(model, pos, neg, cs.Noise_RandomNoise(2), euler, sigmas, latent, 1.0)
    torch.testing.assert_close(unit, plain, rtol=1e-4, atol=1e-4)  # unit scales = the 'both' prediction
    (g,) = call("EditLabDualCFGCombiner", model=model, both=pos, base_only=neg, neither=flow["sd3"][1],
                extra_scale=5.0, base_scale=1.5, schedule="constant", extra_scale_end=5.0, base_scale_end=1.5,
                rescale=0.0)
    guided = run_guider(g, cs.Noise_RandomNoise(2), euler, sigmas, latent)
    assert torch.isfinite(guided).all() and not torch.allclose(guided, plain, atol=1e-3)


@pytest.mark.parametrize("kind", ["sd3", "flux-dev"])
def test_prompt_to_prompt_refuses_joint_attention_models_naming_them(flow, kind):
    """Regression: on MMDiT / Flux the UNet attention patches are never called; the refusal must say so."""
    from editlab.nodes.p2p import ControlSettings, controlled_model
    model = flow[kind][0]
    before = dict(model.model_options)
    name = {"sd3": r"SD3 \(MMDiT\) models \(SD3\)", "flux-dev": r"Flux models \(Flux\)"}[kind]
    with pytest.raises(ValueError, match=rf"does not support {name}: .*joint attention"):
        controlled_model(model, None, ControlSettings())  # refused before the spec is read
    assert model.model_options == before


@pytest.mark.parametrize("kind", ["sd3", "flux-schnell"])
def test_dreambooth_train_refuses_flow_models_before_any_work(flow, kind):
    """DreamBooth's prior-preservation target is k-space maths: a flow model is refused by family, naming it,
    before a latent is read or a file is written."""
    from comfy.weight_adapter import adapter_maps
    algo = next(iter(adapter_maps))
    model, pos, neg, latent, _cfg = flow[kind]
    before = dict(model.model_options)
    with pytest.raises(ValueError, match=r"DreamBooth Train: the model \(.*\) is a flow-matching model"):
        call("EditLabDreamBoothTrain", model=model, instance_latents=latent, instance_conditioning=pos,
             prior_loss_weight=1.0, steps=1, learning_rate=1e-4, rank=2, algorithm=algo, loss_target="model",
             batch_size=1, seed=0, gradient_checkpointing=False, save_every=0, checkpoint_name="flow_refused",
             resume=False, class_latents=latent, class_conditioning=neg)
    assert model.model_options == before
