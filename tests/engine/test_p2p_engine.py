"""Prompt-to-Prompt on the real ComfyUI engine with a random SD1.5-architecture checkpoint (docs/methods.md §5)."""
from __future__ import annotations

import pytest
import torch
from engine_calls import call

P2P_WORKFLOWS = [
    "Prompt-to-Prompt - word swap (generated image)",
    "Prompt-to-Prompt - refine + reweight (generated image)",
    "Prompt-to-Prompt - attention maps per word",
]
FAST = {"steps": 3, "width": 64, "height": 64}


def encode(clip, source, target, mode="replace", reweight_words="", blend_words="", cross_replace_words=""):
    return call("EditLabPromptPairEncode", clip=clip, source=source, target=target, mode=mode,
                reweight_words=reweight_words, reweight_factor=2.0, blend_words=blend_words,
                cross_replace_words=cross_replace_words)


def control(model, edit, cross=0.8, self_=0.4, threshold=0.3, start_blend=0.0, map_size=16):
    return call("EditLabAttentionController", model=model, edit=edit, cross_replace_steps=cross,
                self_replace_steps=self_, self_attention_max_size=16, map_size=map_size,
                blend_threshold=threshold, start_blend=start_blend)[0]


def negative(clip):
    import nodes
    with torch.inference_mode():
        return nodes.CLIPTextEncode().encode(clip, "")[0]


def sample(model, positive, neg, latent, sampler="euler", steps=3, seed=5, cfg=5.0):
    import comfy.samplers
    import comfy_extras.nodes_custom_sampler as cs
    guider = cs.CFGGuider().get_guider(model, positive, neg, cfg)[0]
    with torch.inference_mode():
        sigmas = cs.BasicScheduler().get_sigmas(model, "normal", steps, 1.0)[0]
        out = cs.SamplerCustomAdvanced().sample(cs.Noise_RandomNoise(seed), guider,
                                                comfy.samplers.sampler_object(sampler), sigmas, latent)
    return out[0]["samples"]


def empty_latent(rows=None, edit=None):
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    if edit is not None:
        (latent,) = call("EditLabP2PLatentBatch", latent=latent, edit=edit)
    return latent


# -- workflows --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", P2P_WORKFLOWS)
def test_p2p_workflow_runs_end_to_end(engine, name):
    from PIL import Image
    prompt = engine.prompt(name, **FAST)
    result = engine.run(prompt)
    sizes = []
    for path in result.images:
        with Image.open(path) as im:
            sizes.append(im.size)
    assert sizes.count((64, 64)) == 2, sizes  # source and edit
    if "attention maps" in name:
        assert len(sizes) == 4 and all(s[0] > 64 for s in sizes if s != (64, 64))  # one grid per prompt
    for nid, node in prompt.items():
        if node["class_type"] == "KSampler":
            latent = result.node_output(nid)[0][0]["samples"]
            assert latent.shape == (2, 4, 8, 8) and torch.isfinite(latent).all()


def test_real_clip_tokenizer_alignment(sd15):
    _, clip, _ = sd15
    cond, edit = encode(clip, "a photo of a cat on a skateboard", "a photo of a zebracorn on a skateboard")
    assert cond[0][0].shape == (2, 77, 768) and cond[0][1]["pooled_output"].shape[0] == 2
    hf = clip.tokenizer.clip_l.tokenizer
    for prompt, words in zip(edit.prompts, edit.words):
        assert [t for w in words for t in w.tokens] == hf(prompt)["input_ids"][1:-1]
    creature = edit.words[1][4]
    assert creature.text == "zebracorn" and len(creature.tokens) > 1  # a multi-token word
    m = edit.base[0]
    assert torch.allclose(m[5, creature.positions], torch.full((len(creature.tokens),), 1 / len(creature.tokens)))
    after = edit.words[1][5]  # "on" follows the offset of the multi-token swap
    assert m[6, after.start] == 1
    # ComfyUI's own encoding of the source row is the first row of the batch
    with torch.inference_mode():
        alone = clip.encode_from_tokens(clip.tokenize(edit.prompts[0]))
    torch.testing.assert_close(cond[0][0][:1], alone)


# -- method properties ---------------------------------------------------------------------------------

def test_identical_prompts_give_identical_rows(sd15):
    model, clip, _ = sd15
    cond, edit = encode(clip, "a red car in the street", "a red car in the street")
    out = sample(control(model, edit, cross=1.0, self_=1.0), cond, negative(clip), empty_latent(edit=edit))
    assert torch.equal(out[0], out[1])


@pytest.fixture(scope="module")
def sd15_other(engine, sd15):
    """A second random weight set (the session's seed + 1): the source-row properties must hold on any weights."""
    import nodes
    import random_models
    name = "editlab_p2p_other_weights.safetensors"
    path = engine.root / "models" / "checkpoints" / name
    if not path.exists():
        random_models.build_sd15_checkpoint(path, seed=random_models.weight_seed(1), dtype=torch.float32)
    with torch.inference_mode():
        loaded = nodes.CheckpointLoaderSimple().load_checkpoint(name)[:3]
    first = sd15[0].model.diffusion_model.input_blocks[0][0].weight
    assert not torch.equal(loaded[0].model.diffusion_model.input_blocks[0][0].weight, first)  # other weights
    return loaded


@pytest.mark.parametrize("weights", ["sd15", "sd15_other"])
def test_source_row_equals_the_unedited_generation_and_the_target_differs(request, weights):
    model, clip, _ = request.getfixturevalue(weights)
    cond, edit = encode(clip, "a photo of a cat riding a bicycle", "a photo of a dog riding a bicycle")
    neg = negative(clip)
    controlled = control(model, edit)
    out = sample(controlled, cond, neg, empty_latent(edit=edit))
    # the controlled source row is bit-identical to the same batch sampled without the controller
    free = sample(model, cond, neg, empty_latent(edit=edit))
    assert torch.equal(free[0], out[0])
    assert not torch.allclose(free[1], out[1], atol=1e-3)  # and the controller changed the target
    # ... and equal to sampling the source prompt alone, up to the kernels' batch-size rounding: relative
    # to the latent's scale (random weights give values in the hundreds), not an absolute 1e-4
    source_only = [[cond[0][0][:1], {k: (v[:1] if isinstance(v, torch.Tensor) else v) for k, v in cond[0][1].items()}]]
    plain = sample(model, source_only, neg, {"samples": torch.zeros(1, 4, 8, 8), "batch_index": [0]})
    assert float((out[:1] - plain).abs().max()) <= 1e-5 * float(plain.abs().max()), "source row != source alone"
    assert not torch.allclose(out[0], out[1], atol=1e-3)
    # re-queuing gives the same result; so does a clone of the controlled model made downstream
    again = sample(controlled, cond, neg, empty_latent(edit=edit))
    assert torch.equal(out, again)
    cloned = sample(controlled.clone(), cond, neg, empty_latent(edit=edit))
    assert torch.equal(out, cloned)


def test_several_targets_and_a_batch_size_change_on_the_same_controller_model(sd15):
    model, clip, _ = sd15
    cond3, edit3 = encode(clip, "a photo of a cat", "a photo of a dog\na photo of a fox")
    out = sample(control(model, edit3), cond3, negative(clip), empty_latent(edit=edit3))
    assert out.shape[0] == 3 and torch.isfinite(out).all()
    assert not torch.allclose(out[1], out[2])


@pytest.mark.parametrize("sampler", ["euler", "ddim", "euler_ancestral"])
def test_local_blend_keeps_the_outside_of_the_target_equal_to_the_source(sd15, sampler):
    model, clip, _ = sd15
    cond, edit = encode(clip, "a photo of a cat riding a bicycle", "a photo of a dog riding a bicycle",
                        blend_words="cat, dog")
    controlled = control(model, edit, threshold=0.999, start_blend=0.0, map_size=8)
    out = sample(controlled, cond, negative(clip), empty_latent(edit=edit), sampler=sampler, steps=4)
    controller = controlled.model_options["transformer_options"]["editlab_p2p"]
    mask = controller.maps_for(out).mask  # the mask of the run that produced ``out``
    assert mask.shape == (2, 1, 8, 8)
    outside = (mask[1, 0] == 0).expand_as(out[1])
    assert outside.any() and (~outside).any()
    assert torch.equal(out[1][outside], out[0][outside])
    assert not torch.allclose(out[1][~outside], out[0][~outside], atol=1e-4)


def _maps(controlled, latent_samples):
    return call("EditLabAttentionMaps", model=controlled, samples={"samples": latent_samples}, tile_size=32)[0]


def test_two_samplers_fed_by_one_controlled_model_each_get_their_own_maps(sd15):
    """The maps belong to the run that produced the LATENT given to Attention Maps, whatever ran last."""
    model, clip, _ = sd15
    cond, edit = encode(clip, "a photo of a cat", "a photo of a fat cat", mode="refine")
    controlled = control(model, edit, map_size=4)
    neg = negative(clip)
    a = sample(controlled, cond, neg, empty_latent(edit=edit), seed=1)
    maps_a = _maps(controlled, a)
    b = sample(controlled.clone(), cond, neg, empty_latent(edit=edit), seed=2)  # a second sampler, later
    maps_b = _maps(controlled, b)
    assert not torch.allclose(a, b, atol=1e-3)
    assert not torch.allclose(maps_a, maps_b, atol=1e-3)  # two runs, two sets of maps
    assert torch.equal(_maps(controlled, a), maps_a)  # asked after b ran: still a's own maps
    with pytest.raises(ValueError, match="not produced by a sampling run of this controlled MODEL"):
        _maps(controlled, a + 1.0)


def _forward(patcher, x, sigma, cond, sample_sigmas):
    """One model evaluation exactly as ComfyUI makes it: ``BaseModel.apply_model(x, t, c_concat, c_crossattn,
    control, transformer_options)`` with the patcher's wrappers merged in (``prepare_model_patcher``) and the
    per-forward options of ``calc_cond_batch`` / ``CFGGuider.inner_sample`` — but no outer-sample run."""
    import comfy.patcher_extension as pe
    opts = pe.copy_nested_dicts(patcher.model_options.get("transformer_options", {}))
    pe.merge_nested_dicts(opts.setdefault("wrappers", {}), patcher.wrappers, copy_dict1=False)
    t = torch.full((x.shape[0],), float(sigma))
    opts.update(sample_sigmas=sample_sigmas, sigmas=t, cond_or_uncond=[0])
    with torch.inference_mode():
        return patcher.model.apply_model(x, t, c_crossattn=cond, transformer_options=opts)


def test_the_step_comes_from_each_forward_pass_through_the_real_model_call(sd15):
    """No sampling run has told the controller a schedule: the step of each forward is read from the
    attention call's own options (cross_replace 0.5 of 4 steps: steps 0-1 edited, 2-3 not)."""
    import comfy.model_management
    import comfy_extras.nodes_custom_sampler as cs
    model, clip, _ = sd15
    cond, edit = encode(clip, "a photo of a cat riding a bicycle", "a photo of a dog riding a bicycle")
    controlled = control(model, edit, cross=0.5, self_=0.0)
    comfy.model_management.load_models_gpu([controlled])
    with torch.inference_mode():
        sigmas = cs.BasicScheduler().get_sigmas(model, "normal", 4, 1.0)[0]
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3)).repeat(2, 1, 1, 1) * float(sigmas[0])
    for step, edited in [(0, True), (1, True), (2, False), (3, False)]:
        xs = x * float(sigmas[step] / sigmas[0])
        out = _forward(controlled, xs, sigmas[step], cond[0][0], sigmas)
        plain = _forward(model, xs, sigmas[step], cond[0][0], sigmas)
        assert torch.equal(out[0], plain[0]), step  # the source row is never touched
        assert torch.equal(out[1], plain[1]) != edited, step
    # a schedule no sampling run announced: sigmas[2] is step 0 of its own tail schedule
    tail = sigmas[2:]
    out = _forward(controlled, x, tail[0], cond[0][0], tail)
    plain = _forward(model, x, tail[0], cond[0][0], tail)
    assert not torch.equal(out[1], plain[1]) and torch.equal(out[0], plain[0])


def test_attention_maps_node_labels_every_word(sd15):
    model, clip, _ = sd15
    cond, edit = encode(clip, "a photo of a cat", "a photo of a fat cat", mode="refine")
    controlled = control(model, edit, map_size=4)
    out = sample(controlled, cond, negative(clip), empty_latent(edit=edit))
    (image,) = call("EditLabAttentionMaps", model=controlled, samples={"samples": out}, tile_size=32)
    assert image.shape[0] == 2 and image.shape[-1] == 3 and torch.isfinite(image).all()
    assert image.shape[2] == 32 * 8  # <start> a photo of a fat cat <end> = 8 tiles in one line
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0


def test_nodes_do_not_mutate_their_inputs(sd15):
    model, clip, _ = sd15
    before = dict(model.model_options.get("transformer_options", {}))
    _, edit = encode(clip, "a cat", "a dog", blend_words="cat")
    controlled = control(model, edit)
    assert model.model_options.get("transformer_options", {}).keys() == before.keys()
    assert not model.get_wrappers("outer_sample", "editlab_p2p")
    assert controlled.get_wrappers("outer_sample", "editlab_p2p")
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    call("EditLabP2PLatentBatch", latent=latent, edit=edit)
    assert set(latent) == {"samples"} and latent["samples"].shape[0] == 1


# -- bad input -----------------------------------------------------------------------------------------

def test_bad_inputs_fail_with_clear_messages(sd15):
    model, clip, _ = sd15
    with pytest.raises(ValueError, match="word count .* use refine"):
        encode(clip, "a photo of a cat", "a photo of a fat cat")
    with pytest.raises(ValueError, match="blend word 'horse' is in none"):
        encode(clip, "a photo of a cat", "a photo of a dog", blend_words="horse")
    with pytest.raises(ValueError, match="reweight word 'horse' is not in the target"):
        encode(clip, "a photo of a cat", "a photo of a dog", reweight_words="horse")
    with pytest.raises(ValueError, match="one 77-token CLIP chunk|CLIP chunks"):
        encode(clip, " ".join(["cat"] * 90), " ".join(["dog"] * 90))
    with pytest.raises(ValueError, match="plain text"):
        encode(clip, "a photo of a (cat:1.3)", "a photo of a (dog:1.3)")
    cond, edit = encode(clip, "a photo of a cat", "a photo of a dog")
    controlled = control(model, edit)
    with pytest.raises(ValueError, match="latent batch is 1 but the edit has 2 prompts"):
        sample(controlled, cond, negative(clip), {"samples": torch.zeros(1, 4, 8, 8)})
    with pytest.raises(ValueError, match="start from the same latent"):
        sample(controlled, cond, negative(clip), {"samples": torch.zeros(2, 4, 8, 8)})
    with pytest.raises(ValueError, match="positive conditioning has a batch of 1"):
        sample(controlled, negative(clip), negative(clip), empty_latent(edit=edit))
