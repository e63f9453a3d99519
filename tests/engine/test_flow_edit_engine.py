"""FlowEdit and RF-Inversion (docs/methods.md §11) on the real engine, through SamplerCustomAdvanced, on tiny
random SD3- and Flux-dev-architecture models that ComfyUI's own detection recognises
(``tests/support/flow_models.py``). Expected values come from ComfyUI's native path (CFGGuider + euler)
or from the method's defining properties, never from the node under test. (EditLabError is a ValueError;
the engine imports the pack under its folder's name, so the tests catch ValueError.)
"""
from __future__ import annotations

import pytest
import torch
from engine_calls import call

KINDS = ["sd3", "flux-dev"]
SCALES = {"sd3": (3.5, 13.5), "flux-dev": (1.5, 5.5)}  # the authors' published pairs


def run(guider, sampler, sigmas, latent, noise=None):
    import comfy_extras.nodes_custom_sampler as cs
    with torch.inference_mode():
        return cs.SamplerCustomAdvanced().sample(noise or cs.Noise_EmptyNoise(), guider, sampler, sigmas, latent)[0]["samples"]


def native_euler(model, pos, neg, cfg, sigmas, latent):
    """ComfyUI's own CFGGuider + euler sampler from ``latent`` with noise disabled."""
    import comfy.samplers
    import comfy_extras.nodes_custom_sampler as cs
    guider = cs.CFGGuider().get_guider(model, pos, neg, cfg)[0]
    return run(guider, comfy.samplers.sampler_object("euler"), sigmas, latent)


@pytest.fixture(scope="module")
def flow(engine):
    import flow_models as fm
    import random_models
    seed = random_models.weight_seed()
    return {
        "sd3": (fm.tiny_sd3_model(seed), fm.sd3_conditioning(1), fm.sd3_conditioning(2), fm.sd3_conditioning(3)),
        "flux-dev": (fm.tiny_flux_model(seed), fm.flux_conditioning(1), fm.flux_conditioning(2), fm.flux_conditioning(3)),
        "latent": fm.flow_latent(3),
    }


def schedule(model, steps):
    import comfy.samplers
    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", steps).cpu()


def with_guidance(cond, g):
    import node_helpers
    return node_helpers.conditioning_set_values(cond, {"guidance": g})


# -- FlowEdit ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_flowedit_identical_conditions_return_the_source(flow, kind):
    model, src, tar, neg = flow[kind]
    latent = flow["latent"]
    scale = SCALES[kind][0]
    (guider,) = call("EditLabFlowEditGuider", model=model, source=src, target=src, source_scale=scale,
                     target_scale=scale, negative=neg)
    (sampler,) = call("EditLabFlowEditSampler", n_max=5, n_min=0, n_avg=2, seed=4)
    out = run(guider, sampler, schedule(model, 6), latent)
    # only the latent format's in/out scaling (SD3: shift and scale) separates it from the source
    torch.testing.assert_close(out, latent["samples"], rtol=1e-5, atol=1e-5)
    (edit,) = call("EditLabFlowEditGuider", model=model, source=src, target=tar, source_scale=scale,
                   target_scale=SCALES[kind][1], negative=neg)
    assert not torch.allclose(run(edit, sampler, schedule(model, 6), latent), latent["samples"], atol=1e-3)


@pytest.mark.parametrize("kind", KINDS)
def test_flowedit_one_step_is_the_difference_of_native_predictions(flow, kind):
    """n_max = 1: z_src = (1 - t) x_src + t n, z_tar = z_src, and z = x_src - t (v_tar - v_src) = x_src + D_tar - D_src,
    with each D from ComfyUI's own CFGGuider (one euler step to 0 returns D)."""
    model, src, tar, neg = flow[kind]
    latent = flow["latent"]
    s_src, s_tar = SCALES[kind]
    (guider,) = call("EditLabFlowEditGuider", model=model, source=src, target=tar, source_scale=s_src,
                     target_scale=s_tar, negative=neg)
    (sampler,) = call("EditLabFlowEditSampler", n_max=1, n_min=0, n_avg=1, seed=11)
    sigmas = schedule(model, 4)
    out = run(guider, sampler, sigmas, latent)
    base = model.model
    t = float(sigmas[-2])
    x_src = base.process_latent_in(latent["samples"])
    n = torch.randn(x_src.shape, generator=torch.Generator().manual_seed(11))  # the sampler's documented CPU draw
    z_src = {"samples": base.process_latent_out(((1 - t) * x_src + t * n) / (1 - t))}
    last = sigmas[-2:]
    if kind == "flux-dev":  # guidance-distilled: the scales are the guidance embedding, no CFG pass
        d_src = native_euler(model, with_guidance(src, s_src), neg, 1.0, last, z_src)
        d_tar = native_euler(model, with_guidance(tar, s_tar), neg, 1.0, last, z_src)
    else:
        d_src = native_euler(model, src, neg, s_src, last, z_src)
        d_tar = native_euler(model, tar, neg, s_tar, last, z_src)
    d_src, d_tar = base.process_latent_in(d_src), base.process_latent_in(d_tar)
    torch.testing.assert_close(base.process_latent_in(out), x_src + d_tar - d_src, rtol=1e-4, atol=1e-4)


def test_flowedit_is_seeded_and_needs_its_guider(flow):
    import comfy.samplers
    import comfy_extras.nodes_custom_sampler as cs
    model, src, tar, neg = flow["sd3"]
    latent = flow["latent"]
    (guider,) = call("EditLabFlowEditGuider", model=model, source=src, target=tar, source_scale=3.5,
                     target_scale=13.5, negative=neg)
    sigmas = schedule(model, 5)
    a = run(guider, call("EditLabFlowEditSampler", n_max=4, n_min=1, n_avg=1, seed=1)[0], sigmas, latent)
    b = run(guider, call("EditLabFlowEditSampler", n_max=4, n_min=1, n_avg=1, seed=1)[0], sigmas, latent)
    c = run(guider, call("EditLabFlowEditSampler", n_max=4, n_min=1, n_avg=1, seed=2)[0], sigmas, latent)
    assert torch.equal(a, b) and not torch.allclose(a, c, atol=1e-4)
    plain = cs.CFGGuider().get_guider(model, src, neg, 3.5)[0]
    with pytest.raises(ValueError, match="FlowEdit Guider"):
        run(plain, call("EditLabFlowEditSampler", n_max=4, n_min=0, n_avg=1, seed=1)[0], sigmas, latent)
    with pytest.raises(ValueError, match="negative"):
        call("EditLabFlowEditGuider", model=model, source=src, target=tar, source_scale=3.5, target_scale=13.5)
    # as an ordinary GUIDER it samples the target
    euler = comfy.samplers.sampler_object("euler")
    noise = cs.Noise_RandomNoise(3)
    torch.testing.assert_close(run(guider, euler, sigmas, latent, noise),
                               run(cs.CFGGuider().get_guider(model, tar, neg, 13.5)[0], euler, sigmas, latent, noise))


# -- RF-Inversion ------------------------------------------------------------------------------------

def invert(flow, kind, gamma=0.5, steps=5):
    model, src, _, _ = flow[kind]
    source = with_guidance(src, 0.0) if kind == "flux-dev" else src
    return call("EditLabRFInversionInvert", model=model, positive=source, latent=flow["latent"], steps=steps,
                scheduler="simple", gamma=gamma, seed=7)


@pytest.mark.parametrize("kind", KINDS)
def test_rf_inversion_saved_and_loaded_reproduces(flow, kind):
    model, _, tar, _ = flow[kind]
    inv, noise, sigmas = invert(flow, kind)
    assert inv.meta["method"] == "rf-inversion" and inv.meta["gamma"] == 0.5
    (name,) = call("EditLabSaveInversion", inversion=inv, filename_prefix=f"rf_{kind}", source_prompt="")
    loaded, l_noise, l_sigmas = call("EditLabLoadInversion", inversion=name, model=model)
    assert torch.equal(loaded.trajectory, inv.trajectory) and loaded.meta == inv.meta
    import comfy.samplers
    euler = comfy.samplers.sampler_object("euler")
    outs = []
    for i, s, n in ((inv, sigmas, noise), (loaded, l_sigmas, l_noise)):
        (g,) = call("EditLabRFInversionGuider", model=model, inversion=i, positive=tar, cfg=1.0, eta=0.9,
                    start_step=0, stop_step=2)
        outs.append(run(g, euler, s, n))
    assert torch.isfinite(outs[0]).all()
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_rf_eta_one_reconstructs_and_eta_zero_is_plain_sampling(flow, kind):
    import comfy.samplers
    model, _, tar, _ = flow[kind]
    inv, noise, sigmas = invert(flow, kind)
    euler = comfy.samplers.sampler_object("euler")
    (full,) = call("EditLabRFInversionGuider", model=model, inversion=inv, positive=tar, cfg=1.0, eta=1.0,
                   start_step=0, stop_step=100)
    torch.testing.assert_close(run(full, euler, sigmas, noise), flow["latent"]["samples"], rtol=1e-4, atol=1e-4)
    (off,) = call("EditLabRFInversionGuider", model=model, inversion=inv, positive=tar, cfg=1.0, eta=0.9,
                  start_step=0, stop_step=0)
    torch.testing.assert_close(run(off, euler, sigmas, noise), native_euler(model, tar, tar, 1.0, sigmas, noise),
                               rtol=1e-4, atol=1e-4)
    # a tail of the schedule starts from the inversion's own latent at its first level, not from the noise row
    level = inv.trajectory[2] / (1 - sigmas[2])  # what a noise-disabled sampler turns into trajectory[2]
    start = {"samples": model.model.process_latent_out(level)}
    torch.testing.assert_close(run(off, euler, sigmas[2:], noise),
                               native_euler(model, tar, tar, 1.0, sigmas[2:], start), rtol=1e-4, atol=1e-4)


def test_rf_gamma_one_inverts_to_the_noise_sample(flow):
    """gamma = 1 follows the straight path to y1 (ComfyUI's RandomNoise draw for the seed) exactly."""
    import comfy.sample
    model = flow["sd3"][0]
    inv, _, sigmas = invert(flow, "sd3", gamma=1.0)
    y0 = model.model.process_latent_in(flow["latent"]["samples"])
    y1 = comfy.sample.prepare_noise(flow["latent"]["samples"], 7)
    for k, s in enumerate(sigmas):
        torch.testing.assert_close(inv.trajectory[k], (1 - s) * y0 + s * y1, rtol=1e-4, atol=1e-4)


# -- contracts --------------------------------------------------------------------------------------

def _state(model):
    return ({k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()},
            repr(sorted(model.model_options.keys())), repr(model.model_options.get("transformer_options")),
            dict(model.object_patches), len(model.patches))


def test_inputs_are_not_mutated(flow):
    model, src, tar, neg = flow["flux-dev"]
    before = _state(model)
    src_before = [(c[0].clone(), dict(c[1])) for c in src]
    test_flowedit_identical_conditions_return_the_source(flow, "flux-dev")
    test_rf_inversion_saved_and_loaded_reproduces(flow, "flux-dev")
    after = _state(model)
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert before[1:] == after[1:]
    assert all(torch.equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(src_before, src))


def test_non_flow_models_are_refused(flow, sd15):
    import flow_models as fm
    model, _, _ = sd15
    inv, _, _ = invert(flow, "sd3")
    cond = fm.sd3_conditioning(1)
    with pytest.raises(ValueError, match=r"FlowEdit: the model \(BaseModel.*EPS.*\) is a k-space"):
        call("EditLabFlowEditGuider", model=model, source=cond, target=cond, source_scale=1.0, target_scale=1.0)
    with pytest.raises(ValueError, match=r"RF-Inversion Invert: the model \(BaseModel.*EPS"):
        call("EditLabRFInversionInvert", model=model, positive=cond, latent={"samples": torch.zeros(1, 4, 8, 8)},
             steps=3, scheduler="simple", gamma=0.5, seed=0)
    with pytest.raises(ValueError, match=r"RF-Inversion Guider: the model \(BaseModel.*EPS"):
        call("EditLabRFInversionGuider", model=model, inversion=inv, positive=cond, cfg=1.0, eta=0.9,
             start_step=0, stop_step=2)


def test_real_cfg_on_a_distilled_model_is_refused(flow):
    model, _, tar, neg = flow["flux-dev"]
    inv, _, _ = invert(flow, "flux-dev")
    with pytest.raises(ValueError, match="guidance-distilled"):
        call("EditLabRFInversionGuider", model=model, inversion=inv, positive=tar, cfg=3.0, eta=0.9,
             start_step=0, stop_step=2, negative=neg)
