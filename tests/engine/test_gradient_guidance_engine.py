"""Gradient guidance (docs/methods.md §10) on the real ComfyUI engine: random SD1.5-architecture checkpoint, a
tiny random CLIP in the Hugging Face layout, a tiny random ComfyUI CLIP vision model and a tiny classifier."""
from __future__ import annotations

import json

import pytest
import torch
from model_checks import snapshot

import random_metric_models as rmm
from engine_calls import call

STEPS = 4


def write_classifier(folder, name: str, channels: int, seed: int, takes_sigma: bool = True) -> None:
    from safetensors.torch import save_file
    from editlab.guidance.classifier import ClassifierConfig, NoisyClassifier
    raw = {"arch": "editlab_noisy_convnet", "space": "latent", "channels": channels, "num_classes": 4,
           "takes_sigma": takes_sigma, "width": 16, "depth": 2}
    torch.manual_seed(seed)
    net = NoisyClassifier(ClassifierConfig.from_dict(raw, name))
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(json.dumps(raw))


def tiny_clip_vision(tmp_path):
    """ComfyUI's own CLIP vision class (CLIPVisionModelProjection) on a tiny config, filled with random weights."""
    import comfy.clip_vision
    cfg = {"hidden_act": "quick_gelu", "hidden_size": 32, "image_size": 32, "intermediate_size": 64,
           "layer_norm_eps": 1e-5, "model_type": "clip_vision_model", "num_attention_heads": 2, "num_channels": 3,
           "num_hidden_layers": 2, "patch_size": 8, "projection_dim": 16}
    path = tmp_path / "tiny_clip_vision.json"
    path.write_text(json.dumps(cfg))
    with torch.inference_mode():  # as Load CLIP Vision builds it inside a node
        cv = comfy.clip_vision.ClipVisionModel(str(path))
        g = torch.Generator().manual_seed(5)
        for p in cv.model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.02 if p.ndim > 1 else 0.0) + (1.0 if p.ndim == 1 else 0.0))
    return cv


@pytest.fixture(scope="module")
def setup(engine, sd15, tmp_path_factory):
    import folder_paths
    import nodes
    model, clip, vae = sd15
    metrics = tmp_path_factory.mktemp("guidance_metrics")
    rmm.write_clip(metrics / "guide-clip", seed=3)
    rmm.write_vit(metrics / "not-a-clip", seed=4)
    folder_paths.add_model_folder_path("editlab_metrics", str(metrics), is_default=True)
    classifiers = tmp_path_factory.mktemp("classifiers")
    write_classifier(classifiers, "tiny", 4, seed=0)
    write_classifier(classifiers, "three_channel", 3, seed=1)
    folder_paths.add_model_folder_path("classifiers", str(classifiers), is_default=True)
    enc = nodes.CLIPTextEncode()
    with torch.inference_mode():
        pos = enc.encode(clip, "a red apple")[0]
        neg = enc.encode(clip, "")[0]
        (latent,) = nodes.EmptyLatentImage().generate(64, 64, 1)
        image = nodes.LoadImage().load_image("editlab_photo.png")[0]
    return dict(model=model, vae=vae, pos=pos, neg=neg, latent=latent, image=image,
                tmp=tmp_path_factory.mktemp("cv"))


def clip_loss(**kw):
    args = dict(clip_model="guide-clip", text="a red apple", text_weight=1.0, image_weight=1.0, cutouts=0,
                cut_size_min=0.5, cut_size_max=1.0, augment=0.0, seed=0)
    args.update(kw)
    return call("EditLabCLIPGuidanceLoss", **args)[0]


def guider(s, loss, scale, through="x0", cfg=7.5, start=0.0, end=1.0, every_k=1, rows="", checkpointing=True):
    return call("EditLabGradientGuider", model=s["model"], positive=s["pos"], negative=s["neg"], cfg=cfg, loss=loss,
                scale=scale, sigma_start=start, sigma_end=end, every_k=every_k, gradient_through=through,
                checkpointing=checkpointing, rows=rows, vae=s["vae"])[0]


def sample(s, g, steps=STEPS, seed=1, latent=None):
    import comfy.samplers
    import comfy_extras.nodes_custom_sampler as cs
    import nodes
    with torch.inference_mode():
        sigmas = comfy.samplers.calculate_sigmas(s["model"].get_model_object("model_sampling"), "karras", steps).cpu()
        out = cs.SamplerCustomAdvanced().sample(cs.Noise_RandomNoise(seed), g, comfy.samplers.sampler_object("euler"),
                                                sigmas, latent or s["latent"])[0]
        pixels = nodes.VAEDecode().decode(s["vae"], out)[0]
    return out["samples"], pixels


def loss_of(loss, pixels) -> float:
    with torch.no_grad():
        return float(loss(pixels.movedim(-1, 1).float(), torch.ones(pixels.shape[0])).mean())


def test_clip_guided_run_lowers_the_loss_against_the_unguided_run_at_the_same_seed(setup):
    s = setup
    loss = clip_loss()
    _, plain = sample(s, guider(s, loss, 0.0))
    for through in ("x0", "model"):
        _, guided = sample(s, guider(s, loss, 3000.0, through))
        assert loss_of(loss, guided) < loss_of(loss, plain) - 1e-4, through


def test_classifier_guidance_raises_the_class_probability(setup):
    s = setup
    loss = call("EditLabClassifierGuidanceLoss", classifier="tiny.safetensors", class_index=2)[0]
    assert loss.sees == "noisy"
    plain, _ = sample(s, guider(s, loss, 0.0))
    guided, _ = sample(s, guider(s, loss, 50.0))
    base = s["model"].model
    sigma = torch.full((1,), 0.05)
    with torch.no_grad():
        lp = [float(-loss(base.process_latent_in(x.float()), sigma)) for x in (plain, guided)]
    assert lp[1] > lp[0] + 1e-3, lp


class StandIn:
    """A smooth latent-space loss: half the squared distance of the x0 prediction to a fixed latent."""
    space, sees, needs_sigma = "latent", "denoised", False

    def __init__(self, target: torch.Tensor, interrupt_at: int = 0):
        self.target, self.calls, self.interrupt_at = target, 0, interrupt_at

    def __call__(self, x0, sigma):
        self.calls += 1
        if self.calls == self.interrupt_at:
            import comfy.model_management as mm
            mm.interrupt_current_processing(True)
        return 0.5 * (x0 - self.target.to(x0)).pow(2).flatten(1).sum(-1)


def one_step(s, g, sigma: float):
    import comfy_extras.nodes_custom_sampler as cs
    import comfy.samplers
    with torch.inference_mode():
        return cs.SamplerCustomAdvanced().sample(cs.Noise_RandomNoise(3), g, comfy.samplers.sampler_object("euler"),
                                                 torch.tensor([sigma, 0.0]), s["latent"])[0]["samples"]


def test_model_and_x0_gradients_agree_in_sign_on_a_smooth_stand_in(setup):
    s = setup
    target = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    # a euler step to 0 returns D_hat, so (guided - plain) = s sigma^2 grad log p; at a low sigma and without
    # CFG's amplification D(x) ~ x - sigma eps(x) is close to the identity, where the two modes must agree
    sigma = 0.1
    plain = one_step(s, guider(s, StandIn(target), 0.0, cfg=1.0), sigma)
    moves = {t: one_step(s, guider(s, StandIn(target), 1.0, t, cfg=1.0), sigma) - plain for t in ("x0", "model")}
    a, b = moves["x0"].flatten(), moves["model"].flatten()
    assert a.abs().sum() > 0 and b.abs().sum() > 0 and not torch.allclose(a, b)
    assert float(torch.nn.functional.cosine_similarity(a, b, dim=0)) > 0.5
    assert float((a.sign() == b.sign()).float().mean()) > 0.75


def test_window_and_every_k_count_the_gradient_steps_in_the_engine(setup):
    s = setup
    loss = StandIn(torch.zeros(1, 4, 8, 8))
    sample(s, guider(s, loss, 1.0, start=0.2, end=0.8, every_k=2), steps=6)
    assert loss.calls == 2  # fractions i / 5: the window holds steps 1..4, every 2nd from step 1 -> 1, 3


def test_no_input_is_mutated_and_cancel_mid_run_leaves_the_model_untouched(setup):
    import comfy.model_management as mm
    import comfy.samplers
    s = setup
    before = snapshot([s["model"], s["vae"], s["pos"], s["neg"], s["latent"]])
    params = dict(s["model"].model.diffusion_model.named_parameters())
    vae_params = dict(s["vae"].first_stage_model.named_parameters())
    sample(s, guider(s, clip_loss(), 100.0, "model"))
    loss = StandIn(torch.zeros(1, 4, 8, 8), interrupt_at=2)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            sample(s, guider(s, loss, 1.0, "model"))
    finally:
        mm.interrupt_current_processing(False)
    assert loss.calls == 2  # stopped at the step that saw the cancel, not at the end of the run
    assert snapshot([s["model"], s["vae"], s["pos"], s["neg"], s["latent"]]) == before
    after = dict(s["model"].model.diffusion_model.named_parameters())
    assert all(after[n] is p and p.is_inference() for n, p in params.items())  # nothing left swapped
    assert all(dict(s["vae"].first_stage_model.named_parameters())[n] is p for n, p in vae_params.items())
    assert not any("forward" in m.__dict__ for m in s["model"].model.diffusion_model.modules())  # no checkpoint patch
    # the wrapping node leaves its input GUIDER as it was
    plain = comfy.samplers.CFGGuider(s["model"])
    wrapped = call("EditLabGradientGuidance", guider=plain, loss=clip_loss(), scale=1.0, sigma_start=0.0,
                   sigma_end=1.0, every_k=1, gradient_through="x0", checkpointing=True, rows="", vae=s["vae"])[0]
    assert type(plain) is comfy.samplers.CFGGuider and wrapped is not plain and not hasattr(plain, "gradient_guidance")


def test_clip_vision_path_gives_a_nonzero_gradient_where_comfys_preprocessing_gives_none(setup):
    import comfy.clip_vision
    from editlab.nodes.gradients import autograd_weights
    from editlab.nodes.guidance_losses import clip_vision_embeds
    s = setup
    cv = tiny_clip_vision(s["tmp"])
    loss = call("EditLabCLIPGuidanceLoss", clip_model="(none)", text="", text_weight=1.0, image_weight=1.0,
                cutouts=2, cut_size_min=0.5, cut_size_max=1.0, augment=0.02, seed=0, clip_vision=cv,
                image=s["image"])[0]
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode(False), torch.enable_grad(), autograd_weights(cv.model):
        x = pixels.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss(x, torch.ones(1)).sum(), x)
        y = pixels.clone().requires_grad_(True)
        ref = comfy.clip_vision.clip_preprocess(y.movedim(1, -1), size=32).float()
        (zero,) = torch.autograd.grad(clip_vision_embeds(cv.model, ref).sum(), y)
    with torch.inference_mode():  # the differentiable forward computes ComfyUI's own embedding
        probe = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
        assert torch.allclose(clip_vision_embeds(cv.model, probe), cv.model(pixel_values=probe)[2], atol=1e-5)
    assert grad.abs().sum() > 0 and torch.isfinite(grad).all()
    assert zero.abs().sum() == 0  # why the node has its own preprocessing
    _, plain = sample(s, guider(s, loss, 0.0), steps=2)
    _, guided = sample(s, guider(s, loss, 1000.0), steps=2)
    assert not torch.allclose(plain, guided)


def test_bad_inputs_are_refused_before_any_work(setup, monkeypatch):
    s = setup
    bad = call("EditLabClassifierGuidanceLoss", classifier="three_channel.safetensors", class_index=0)[0]
    with pytest.raises(ValueError, match="3-channel latents but the model's latents have 4"):
        guider(s, bad, 1.0)
    with pytest.raises(ValueError, match="'vit' model"):
        clip_loss(clip_model="not-a-clip")
    with pytest.raises(ValueError, match="not a CLIP image tower"):
        clip_loss(clip_model="(none)", text="", clip_vision=type("Dino", (), {"model": torch.nn.Linear(1, 1)})(),
                  image=s["image"])
    with pytest.raises(ValueError, match="text tower"):
        clip_loss(clip_model="(none)", clip_vision=tiny_clip_vision(s["tmp"]))
    with pytest.raises(ValueError, match="no target"):
        clip_loss(text="  ")
    with pytest.raises(ValueError, match="class_index 9"):
        call("EditLabClassifierGuidanceLoss", classifier="tiny.safetensors", class_index=9)
    with pytest.raises(ValueError, match="connect the checkpoint's VAE"):
        call("EditLabGradientGuider", model=s["model"], positive=s["pos"], negative=s["neg"], cfg=7.5,
             loss=clip_loss(), scale=1.0, sigma_start=0.0, sigma_end=1.0, every_k=1, gradient_through="x0",
             checkpointing=True, rows="")
    with pytest.raises(ValueError, match="after sigma_end"):
        guider(s, clip_loss(), 1.0, start=0.9, end=0.1)
    with pytest.raises(ValueError, match="outside the batch"):
        sample(s, guider(s, StandIn(torch.zeros(1, 4, 8, 8)), 1.0, rows="3"), steps=1)


def _one_step_closed_form(model, pos, neg, latent, loss_target, sigma, k):
    """A euler step from sigma to 0 returns D_hat: in x0 mode with the stand-in, D + s k^2 (target - D)."""
    import comfy.samplers
    import comfy_extras.nodes_custom_sampler as cs
    outs = {}
    for scale in (0.0, 0.5):
        (g,) = call("EditLabGradientGuider", model=model, positive=pos, negative=neg, cfg=1.0,
                    loss=StandIn(loss_target), scale=scale, sigma_start=0.0, sigma_end=1.0, every_k=1,
                    gradient_through="x0", checkpointing=False, rows="")
        with torch.inference_mode():
            out = cs.SamplerCustomAdvanced().sample(cs.Noise_RandomNoise(3), g, comfy.samplers.sampler_object("euler"),
                                                    torch.tensor([sigma, 0.0]), latent)[0]["samples"]
        outs[scale] = model.model.process_latent_in(out.float())
    d = outs[0.0]
    torch.testing.assert_close(outs[0.5], d + 0.5 * k ** 2 * (loss_target - d), rtol=1e-3, atol=1e-3)


def test_the_guided_step_is_d_plus_s_sigma_squared_grad_in_the_engine(setup):
    s = setup
    target = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    _one_step_closed_form(s["model"], s["pos"], s["neg"], s["latent"], target, 0.5, 0.5)


def test_flow_models_use_the_k_space_counterpart_of_the_step(engine):
    import flow_models as fm
    import random_models
    model = fm.tiny_sd3_model(random_models.weight_seed())
    latent = fm.flow_latent(3)
    target = torch.randn(latent["samples"].shape, generator=torch.Generator().manual_seed(4))
    # sigma 0.6 on flow is k-space level k = 0.6 / 0.4 = 1.5
    _one_step_closed_form(model, fm.sd3_conditioning(1), fm.sd3_conditioning(2), latent, target, 0.6, 1.5)


def test_guidance_on_a_guider_with_rows_nudges_only_the_target_row_of_a_direct_inversion_edit(setup):
    """The wrapping node on the Inversion Guider (direct mode), rows = '1': the source row still reconstructs the
    inverted pivot exactly as without guidance; the target row moves."""
    import comfy.samplers
    import comfy_extras.nodes_custom_sampler as cs
    import nodes
    s = setup
    with torch.inference_mode():
        (photo,) = nodes.VAEEncode().encode(s["vae"], s["image"])
    inv, noise, sigmas = call("EditLabDDIMInvert", model=s["model"], positive=s["pos"], latent=photo, steps=3,
                              scheduler="ddim_uniform", guidance=1.0, input_scaling="reference")
    batch = {"samples": noise["samples"].repeat(2, 1, 1, 1)}
    pos2 = [[torch.cat([s["pos"][0][0]] * 2), dict(s["pos"][0][1])]]
    (edit,) = call("EditLabInversionGuider", model=s["model"], inversion=inv, positive=pos2, negative=s["neg"],
                   cfg=7.5, mode="direct", check_model=True)
    outs = {}
    for scale in (0.0, 3000.0):
        (g,) = call("EditLabGradientGuidance", guider=edit, loss=clip_loss(), scale=scale, sigma_start=0.0,
                    sigma_end=1.0, every_k=1, gradient_through="x0", checkpointing=True, rows="1", vae=s["vae"])
        with torch.inference_mode():
            outs[scale] = cs.SamplerCustomAdvanced().sample(cs.Noise_EmptyNoise(), g, comfy.samplers.sampler_object("euler"),
                                                            sigmas, batch)[0]["samples"]
    torch.testing.assert_close(outs[3000.0][0], outs[0.0][0])  # source row: untouched by the guidance
    assert not torch.allclose(outs[3000.0][1], outs[0.0][1], atol=1e-4)  # target row: guided


def random_taesd():
    """A ComfyUI VAE holding a TAESD (tiny autoencoder) with random weights, as VAELoader builds it for 'taesd'."""
    import comfy.sd
    import comfy.taesd.taesd
    net = comfy.taesd.taesd.TAESD()
    g = torch.Generator().manual_seed(7)
    sd = {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in net.state_dict().items()}
    sd["vae_scale"], sd["vae_shift"] = torch.tensor(0.18215), torch.tensor(0.0)
    with torch.inference_mode():
        return comfy.sd.VAE(sd=sd)


def test_a_tiny_autoencoder_can_stand_in_for_the_vae_in_the_loss(setup):
    """TAESD as the guider's vae (the cheap decoder the README suggests): the guided run works and moves."""
    s = setup
    taesd = random_taesd()
    outs = {}
    for scale in (0.0, 3000.0):
        g = call("EditLabGradientGuider", model=s["model"], positive=s["pos"], negative=s["neg"], cfg=7.5,
                 loss=clip_loss(), scale=scale, sigma_start=0.0, sigma_end=1.0, every_k=1, gradient_through="x0",
                 checkpointing=True, rows="", vae=taesd)[0]
        outs[scale], _ = sample(s, g, steps=2)
    assert torch.isfinite(outs[3000.0]).all() and not torch.allclose(outs[0.0], outs[3000.0], atol=1e-4)


def test_checkpointing_splits_each_decoder_into_blocks_and_changes_no_result(setup):
    """Gradient checkpointing wraps the decoder's blocks one by one, TAESD's too (it was checkpointed as one
    segment: recomputed whole in backward, no peak memory saved), and a guided run with it equals the run
    without it."""
    from editlab.nodes.gradient_guidance import checkpointed, decoder_of
    s = setup
    for vae, least in ((random_taesd(), 10), (s["vae"], 10)):
        decoder = decoder_of(vae.first_stage_model)
        assert decoder is not vae.first_stage_model
        with checkpointed(decoder):
            wrapped = [m for m in decoder.modules() if "forward" in m.__dict__]
        assert len(wrapped) >= least, f"{type(decoder).__name__}: {len(wrapped)} checkpointed blocks"
        assert not [m for m in decoder.modules() if "forward" in m.__dict__]  # put back on exit
        outs = []
        for ckpt in (True, False):
            g = call("EditLabGradientGuider", model=s["model"], positive=s["pos"], negative=s["neg"], cfg=7.5,
                     loss=clip_loss(), scale=3000.0, sigma_start=0.0, sigma_end=1.0, every_k=1,
                     gradient_through="x0", checkpointing=ckpt, rows="", vae=vae)[0]
            outs.append(sample(s, g, steps=2)[0])
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)
