"""DreamBooth on the real ComfyUI engine with the random SD1.5-architecture checkpoint."""
from __future__ import annotations

import os

import pytest
import torch
from engine_calls import call

SIZE = 32  # px: a 4x4 latent keeps each training step to a fraction of a second


@pytest.fixture(scope="module")
def data(engine, sd15):
    import nodes
    model, clip, vae = sd15
    enc = nodes.CLIPTextEncode()
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        inst_cond = enc.encode(clip, "a vzk dog")[0]
        cls_cond = enc.encode(clip, "a dog")[0]
        empty = enc.encode(clip, "")[0]
    instance = {"samples": torch.randn((3, 4, SIZE // 8, SIZE // 8), generator=g)}
    classes = {"samples": torch.randn((4, 4, SIZE // 8, SIZE // 8), generator=g)}
    return dict(model=model, clip=clip, inst_cond=inst_cond, cls_cond=cls_cond, empty=empty, instance=instance,
                classes=classes)


def train(data, **over):
    args = dict(model=data["model"], instance_latents=data["instance"], instance_conditioning=data["inst_cond"],
                class_latents=data["classes"], class_conditioning=data["cls_cond"], prior_loss_weight=1.0, steps=4,
                learning_rate=1e-3, rank=4, algorithm="LoRA", loss_target="model", batch_size=1, seed=0,
                gradient_checkpointing=False, save_every=0, checkpoint_name="dreambooth", resume=False)
    args.update(over)
    return call("EditLabDreamBoothTrain", **args)


def predict(model, cond, x, sigma: float):
    """The model's denoised prediction through ComfyUI's own guider machinery (cfg 1)."""
    import comfy.samplers
    import comfy.sampler_helpers
    with torch.inference_mode():
        guider = comfy.samplers.CFGGuider(model)
        guider.inner_set_conds({"positive": cond})
        guider.set_cfg(1.0)
        captured = {}

        class Probe(comfy.samplers.Sampler):
            def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
                       disable_pbar=False):
                captured["d"] = model_wrap(latent_image, sigmas[:1].expand(latent_image.shape[0]), **extra_args)
                return latent_image

        guider.sample(torch.zeros_like(x), x, Probe(), torch.tensor([sigma, 0.0]), seed=0)
        return captured["d"].float().cpu()


def weights_of(model) -> dict:
    return {k: v.clone() for k, v in model.model.state_dict().items()}


# -- identifier -----------------------------------------------------------------------------------

def test_rare_identifier_is_one_rare_token_deterministic_by_seed(data):
    from editlab.training.identifier import COMMON_WORDS
    clip = data["clip"]
    a, report = call("EditLabRareTokenIdentifier", clip=clip, seed=0, identifier="")
    again, _ = call("EditLabRareTokenIdentifier", clip=clip, seed=0, identifier="")
    others = {call("EditLabRareTokenIdentifier", clip=clip, seed=s, identifier="")[0] for s in range(1, 6)}
    assert a == again and len(others | {a}) > 1
    tokens = clip.tokenize(a)["l"][0]
    assert int(tokens[2][0]) == 49407  # BOS, the identifier, EOS: exactly one token
    assert 1 <= len(a) <= 3 and a not in COMMON_WORDS and "token id" in report


def test_identifier_refuses_real_words_and_several_tokens(data):
    with pytest.raises(ValueError, match="common word"):
        call("EditLabRareTokenIdentifier", clip=data["clip"], seed=0, identifier="dog")
    with pytest.raises(ValueError, match="tokens"):
        call("EditLabRareTokenIdentifier", clip=data["clip"], seed=0, identifier="zqxjkvbrt")


# -- training -------------------------------------------------------------------------------------

def test_training_lowers_the_instance_loss_on_the_same_draws(data):
    # Same seed = the same rows, levels and noise at every step: a paired comparison of the losses.
    _, _, still, _ = train(data, learning_rate=1e-7, steps=8)
    _, _, learnt, _ = train(data, learning_rate=3e-3, steps=8)
    assert still["instance"][0] == pytest.approx(learnt["instance"][0], rel=1e-4)  # step 1: same weights
    late = slice(4, 8)
    assert sum(learnt["instance"][late]) < 0.9 * sum(still["instance"][late])


def test_zero_prior_weight_equals_instance_only_training(data):
    _, lora_zero, loss_zero, _ = train(data, prior_loss_weight=0.0)
    _, lora_only, loss_only, _ = train(data, prior_loss_weight=0.0, class_latents=None, class_conditioning=None)
    _, lora_prior, _, _ = train(data, prior_loss_weight=1.0)
    assert loss_zero["instance"] == loss_only["instance"]
    assert all(torch.equal(lora_zero[k], lora_only[k]) for k in lora_only)
    assert any(not torch.equal(lora_zero[k], lora_prior[k]) for k in lora_only)  # the prior term does act
    assert set(loss_zero["prior"]) == {0.0}


def test_prior_preservation_keeps_the_class_prompt_closer_to_the_frozen_model(data):
    """Language drift: after the same steps on the same seed, 'a dog' moves less with lambda = 1."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn((4, 4, SIZE // 8, SIZE // 8), generator=g) * 3.0
    frozen = predict(data["model"], data["cls_cond"], x, 3.0)
    drift = {}
    for lam in (0.0, 1.0):
        trained = train(data, prior_loss_weight=lam, steps=12, learning_rate=3e-3)[0]
        drift[lam] = (predict(trained, data["cls_cond"], x, 3.0) - frozen).pow(2).mean().item()
    assert drift[1.0] < drift[0.0], drift


def test_saved_lora_reproduces_the_trained_model_through_core_loaders(engine, data, tmp_path):
    import folder_paths
    import nodes
    import safetensors.torch
    trained, lora, _, _ = train(data)
    x = torch.randn((1, 4, SIZE // 8, SIZE // 8), generator=torch.Generator().manual_seed(1))
    want = predict(trained, data["inst_cond"], x, 2.0)
    base = predict(data["model"], data["inst_cond"], x, 2.0)
    assert (want - base).abs().max() > 1e-4  # the adapter changes the model
    # core Load LoRA Model (LORA_MODEL in memory)
    with torch.inference_mode():
        (via_core,) = nodes.NODE_CLASS_MAPPINGS["LoraModelLoader"]().load_lora_model(data["model"], lora, 1.0)
    got = predict(via_core, data["inst_cond"], x, 2.0)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    # a file in a loras folder through LoraLoaderModelOnly
    loras = tmp_path / "loras"
    loras.mkdir()
    safetensors.torch.save_file({k: v.contiguous() for k, v in lora.items()}, str(loras / "subject.safetensors"))
    folder_paths.add_model_folder_path("loras", str(loras))
    with torch.inference_mode():
        (via_file,) = nodes.LoraLoaderModelOnly().load_lora_model_only(data["model"], "subject.safetensors", 1.0)
    got = predict(via_file, data["inst_cond"], x, 2.0)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_resume_from_a_periodic_checkpoint_continues_the_run(engine, data):
    import folder_paths
    _, lora_full, loss_full, _ = train(data, steps=4)
    train(data, steps=2, save_every=1, checkpoint_name="resume_test")
    path = os.path.join(folder_paths.get_output_directory(), "editlab_dreambooth", "resume_test.safetensors")
    assert os.path.isfile(path)
    _, lora_resumed, loss_resumed, steps = train(data, steps=4, save_every=1, checkpoint_name="resume_test",
                                                 resume=True)
    assert steps == 4 and len(loss_resumed["loss"]) == 4
    assert loss_resumed["loss"] == pytest.approx(loss_full["loss"], rel=1e-5)
    assert all(torch.allclose(lora_resumed[k], lora_full[k], rtol=1e-5, atol=1e-7) for k in lora_full)


def test_cancel_mid_training_leaves_the_input_model_untouched(data):
    import comfy.model_management
    import comfy.patcher_extension
    model = data["model"].clone()
    before_weights = weights_of(model)
    before = (dict(model.patches), repr(model.model_options), dict(model.weight_wrapper_patches))
    x = torch.randn((1, 4, SIZE // 8, SIZE // 8), generator=torch.Generator().manual_seed(2))
    sample_before = predict(model, data["inst_cond"], x, 2.0)
    calls = {"n": 0}

    def interrupt_on_third(executor, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            comfy.model_management.interrupt_current_processing(True)
        return executor(*args, **kwargs)

    watched = model.clone()
    watched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test", interrupt_on_third)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            train(data, model=watched, steps=20)
    finally:
        comfy.model_management.interrupt_current_processing(False)
    assert 3 <= calls["n"] < 20
    after_weights = weights_of(model)
    assert before_weights.keys() == after_weights.keys()
    assert all(torch.equal(before_weights[k], after_weights[k]) for k in before_weights)
    assert (dict(model.patches), repr(model.model_options), dict(model.weight_wrapper_patches)) == before
    assert torch.equal(predict(model, data["inst_cond"], x, 2.0), sample_before)


def test_bad_inputs_fail_before_any_training(data):
    two = [[torch.cat([data["inst_cond"][0][0]] * 2), {}]]
    with pytest.raises(ValueError, match="2 prompts for 3 images"):
        train(data, instance_conditioning=two)
    with pytest.raises(ValueError, match="needs class_latents"):
        train(data, class_latents=None)
    small = {"samples": torch.zeros((2, 4, 2, 2))}
    with pytest.raises(ValueError, match="subject images' size"):
        train(data, class_latents=small)
    with pytest.raises(ValueError, match="checkpoint_name"):
        train(data, save_every=1, checkpoint_name="../escape")


def test_class_prior_images_do_not_depend_on_the_chunk_size(data):
    args = dict(model=data["model"], positive=data["cls_cond"], negative=data["empty"], count=3, width=SIZE,
                height=SIZE, steps=2, cfg=3.0, sampler_name="euler", scheduler="normal", seed=7)
    (one,) = call("EditLabClassPriorImages", chunk_size=1, **args)
    (three,) = call("EditLabClassPriorImages", chunk_size=3, **args)
    (other_seed,) = call("EditLabClassPriorImages", chunk_size=3, **{**args, "seed": 8})
    a, b = one["samples"], three["samples"]
    assert a.shape == (3, 4, SIZE // 8, SIZE // 8)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * a.abs().max().item())  # batch size changes float sums only
    assert not torch.allclose(a, other_seed["samples"])
