"""Inversion suite on the real ComfyUI engine with the random SD1.5-architecture checkpoint."""
from __future__ import annotations

import os

import pytest
import torch

STEPS = 5


def node(node_id: str):
    import nodes
    return nodes.NODE_CLASS_MAPPINGS[node_id]


def call(node_id: str, **kwargs):
    with torch.inference_mode():
        return node(node_id).execute(**kwargs).result


@pytest.fixture(scope="module")
def setup(engine, sd15):
    import nodes
    model, clip, vae = sd15
    enc = nodes.CLIPTextEncode()
    with torch.inference_mode():
        src = enc.encode(clip, "a photo of a lake with a boat")[0]
        empty = enc.encode(clip, "")[0]
        img = nodes.LoadImage().load_image("editlab_photo.png")[0]
        (latent,) = nodes.VAEEncode().encode(vae, img)
    inv, noise, sigmas = call("EditLabDDIMInvert", model=model, positive=src, latent=latent, steps=STEPS,
                              scheduler="ddim_uniform", guidance=1.0, input_scaling="reference")
    return dict(model=model, src=src, empty=empty, latent=latent, inv=inv, noise=noise, sigmas=sigmas)


@pytest.fixture(scope="module")
def tuned(setup):
    s = setup
    (inv,) = call("EditLabNullTextOptimize", model=s["model"], inversion=s["inv"], negative=s["empty"], guidance=7.5,
                  inner_steps=10, early_stop=1e-5, early_stop_slope=2e-5, learning_rate=1e-2, check_model=True)
    return inv


def replay(s, inv, mode, cfg=7.5, positive=None, noise=None, sampler="euler"):
    import comfy.samplers
    import comfy_extras.nodes_custom_sampler as cs
    from editlab.samplers.inversion import psnr
    (guider,) = call("EditLabInversionGuider", model=s["model"], inversion=inv, positive=positive or s["src"],
                     negative=s["empty"], cfg=cfg, mode=mode, check_model=True)
    with torch.inference_mode():
        out = cs.SamplerCustomAdvanced().sample(cs.Noise_EmptyNoise(), guider, comfy.samplers.sampler_object(sampler),
                                                s["sigmas"], noise or s["noise"])[0]["samples"]
    return out, psnr(out[:1], s["latent"]["samples"])


def test_inversion_record(setup):
    inv, sigmas = setup["inv"], setup["sigmas"]
    assert inv.steps == STEPS and torch.equal(inv.sigmas, sigmas) and float(sigmas[-1]) == 0.0
    assert inv.trajectory.shape == (STEPS + 1, 1, 4, 8, 8) and inv.trajectory.device.type == "cpu"
    assert torch.allclose(inv.trajectory[-1], setup["model"].model.process_latent_in(setup["latent"]["samples"]))
    assert torch.allclose(setup["model"].model.process_latent_in(setup["noise"]["samples"]), inv.trajectory[0], atol=1e-5)


def test_direct_reconstructs_exactly_and_null_text_beats_the_drift(setup, tuned):
    _, p_direct = replay(setup, setup["inv"], "direct")
    _, p_plain = replay(setup, setup["inv"], "plain")
    _, p_null = replay(setup, tuned, "null-text")
    _, p_neg = replay(setup, setup["inv"], "negative-prompt")
    _, p_cfg1 = replay(setup, setup["inv"], "plain", cfg=1.0)
    assert p_direct > 90, p_direct  # float tolerance
    assert p_null > p_plain + 6, (p_null, p_plain)
    assert p_cfg1 > p_plain and p_neg == pytest.approx(p_cfg1, abs=1e-3)  # source as negative == no guidance


def test_secant_null_text_runs_in_the_engine_with_fewer_passes_and_beats_the_drift(setup, tuned):
    s = setup
    (fast,) = call("EditLabNullTextOptimize", model=s["model"], inversion=s["inv"], negative=s["empty"], guidance=7.5,
                   inner_steps=3, early_stop=1e-5, early_stop_slope=2e-5, learning_rate=1e-2, check_model=True,
                   secant=True)
    meta, paper = fast.meta["null_text"], tuned.meta["null_text"]
    assert meta["secant"] is True and paper["secant"] is False and paper["secant_factor_median"] is None
    assert meta["backwards"] <= 3 * STEPS < paper["backwards"] and meta["forwards"] < paper["forwards"]
    assert isinstance(meta["secant_factor_median"], float) and meta["secant_factor_median"] > 0
    assert fast.null_embeddings.shape == tuned.null_embeddings.shape
    _, p_fast = replay(s, fast, "null-text")
    _, p_plain = replay(s, s["inv"], "plain")
    assert p_fast > p_plain + 6, (p_fast, p_plain)


def test_direct_edits_keep_the_source_row_exact_while_other_rows_change(setup):
    s = setup
    from editlab.samplers.inversion import psnr
    with torch.inference_mode():
        both = torch.cat([s["src"][0][0], s["src"][0][0] * 0.5])  # [source, target] rows
    positive = [[both, {}]]
    noise = {"samples": s["noise"]["samples"].repeat(2, 1, 1, 1)}
    out, _ = replay(s, s["inv"], "direct", positive=positive, noise=noise)
    assert psnr(out[:1], s["latent"]["samples"]) > 90
    assert not torch.allclose(out[1:], out[:1], atol=1e-2)


def test_schedule_and_model_mismatch_are_refused(setup):
    import comfy.samplers
    import comfy_extras.nodes_custom_sampler as cs
    s = setup
    (guider,) = call("EditLabInversionGuider", model=s["model"], inversion=s["inv"], positive=s["src"],
                     negative=s["empty"], cfg=7.5, mode="direct", check_model=True)
    with pytest.raises(ValueError, match="schedule does not match"), torch.inference_mode():
        cs.SamplerCustomAdvanced().sample(cs.Noise_EmptyNoise(), guider, comfy.samplers.sampler_object("euler"),
                                          s["sigmas"] * 1.01, s["noise"])
    other = s["model"].clone()
    key = next(k for k in other.model.state_dict() if k.endswith("out.2.weight"))
    other.add_patches({key: (torch.ones_like(other.model.state_dict()[key]) * 1e-3,)}, 1.0)
    with pytest.raises(ValueError, match="another model"):
        call("EditLabInversionGuider", model=other, inversion=s["inv"], positive=s["src"], negative=s["empty"],
             cfg=7.5, mode="direct", check_model=True)
    with pytest.raises(ValueError, match="Null-Text Optimize"):
        call("EditLabInversionGuider", model=s["model"], inversion=s["inv"], positive=s["src"], negative=s["empty"],
             cfg=7.5, mode="null-text", check_model=True)


def test_null_text_leaves_the_model_untouched_and_cancels_cleanly(setup):
    import comfy.model_management as mm
    s = setup
    params = {n: p for n, p in s["model"].model.diffusion_model.named_parameters()}
    (inv,) = call("EditLabNullTextOptimize", model=s["model"], inversion=s["inv"], negative=s["empty"], guidance=7.5,
                  inner_steps=1, early_stop=1e-5, early_stop_slope=2e-5, learning_rate=1e-2, check_model=True)
    assert inv.null_embeddings.shape == (STEPS, 1, 77, 768) and inv.null_embeddings.dtype == torch.float32
    assert s["inv"].null_embeddings is None  # the input INVERSION is not mutated
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            call("EditLabNullTextOptimize", model=s["model"], inversion=s["inv"], negative=s["empty"], guidance=7.5,
                 inner_steps=3, early_stop=1e-5, early_stop_slope=2e-5, learning_rate=1e-2, check_model=True)
    finally:
        mm.interrupt_current_processing(False)
    after = {n: p for n, p in s["model"].model.diffusion_model.named_parameters()}
    assert all(after[n] is p and p.is_inference() for n, p in params.items())  # nothing left swapped


def test_save_and_load_round_trip_and_bad_files(setup, tuned, engine):
    import folder_paths
    s = setup
    (name,) = call("EditLabSaveInversion", inversion=tuned, filename_prefix="../../escape/attempt", source_prompt="a lake")
    assert name.startswith("output/attempt_") and name.endswith(".safetensors")
    path = os.path.join(folder_paths.get_output_directory(), "inversions", name.split("/", 1)[1])
    assert os.path.isfile(path) and not [f for f in os.listdir(os.path.dirname(path)) if f.endswith(".tmp")]
    loaded, noise, sigmas = call("EditLabLoadInversion", inversion=name, model=s["model"])
    assert torch.equal(loaded.null_embeddings, tuned.null_embeddings) and torch.equal(loaded.trajectory, tuned.trajectory)
    assert loaded.meta["source_prompt"] == "a lake"
    torch.testing.assert_close(noise["samples"], s["noise"]["samples"], atol=1e-5, rtol=1e-5)
    _, p1 = replay(s, tuned, "null-text")
    _, p2 = replay(s, loaded, "null-text")
    assert p1 == pytest.approx(p2)
    # Corrupt and foreign files in input/inversions give clear errors.
    folder = os.path.join(folder_paths.get_input_directory(), "inversions")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "corrupt.safetensors"), "wb") as fh:
        fh.write(b"\x00garbage")
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, os.path.join(folder, "foreign.safetensors"))
    with pytest.raises(ValueError, match="not a readable safetensors"):
        call("EditLabLoadInversion", inversion="input/corrupt.safetensors", model=s["model"])
    with pytest.raises(ValueError, match="not an EditLab inversion"):
        call("EditLabLoadInversion", inversion="input/foreign.safetensors", model=s["model"])
    with pytest.raises(ValueError, match="not an inversion file name|outside"):
        call("EditLabLoadInversion", inversion="input/../x.safetensors", model=s["model"])


def test_bad_inputs(setup):
    s = setup
    with torch.inference_mode():
        two = [[torch.cat([s["src"][0][0]] * 2), {}]]
    with pytest.raises(ValueError, match="batch 2 but the latent has 1"):
        call("EditLabDDIMInvert", model=s["model"], positive=two, latent=s["latent"], steps=3, scheduler="ddim_uniform",
             guidance=1.0, input_scaling="reference")
    bad = {"samples": s["latent"]["samples"].clone()}
    bad["samples"][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        call("EditLabDDIMInvert", model=s["model"], positive=s["src"], latent=bad, steps=3, scheduler="ddim_uniform",
             guidance=1.0, input_scaling="reference")
    with pytest.raises(ValueError, match="steps must be at least 1"):
        call("EditLabDDIMInvert", model=s["model"], positive=s["src"], latent=s["latent"], steps=0,
             scheduler="ddim_uniform", guidance=1.0, input_scaling="reference")
    with pytest.raises(ValueError, match="needs a negative"):
        call("EditLabDDIMInvert", model=s["model"], positive=s["src"], latent=s["latent"], steps=3,
             scheduler="ddim_uniform", guidance=3.0, input_scaling="reference")


def test_real_photo_p2p_edit_with_direct_inversion_reconstructs_the_source_row(engine):
    """The shipped real-photo workflow: [source, target] from the inverted noise under the attention
    controller; the source row is the photo (to float tolerance), the target row is an edit."""
    prompt = engine.prompt("Prompt-to-Prompt - real photo, direct inversion", steps=4)
    result = engine.run(prompt)
    psnr_id = next(k for k, v in prompt.items() if v["class_type"] == "EditLabReconstructionPSNR")
    sampled = next(k for k, v in prompt.items() if v["class_type"] == "SamplerCustomAdvanced")
    value = result.node_output(psnr_id)[0][0]
    rows = result.node_output(sampled)[0][0]["samples"]
    assert value > 90, value
    assert rows.shape[0] == 2 and not torch.allclose(rows[0], rows[1], atol=1e-3)
