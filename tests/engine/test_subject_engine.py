"""BLIP-Diffusion subject nodes on the real ComfyUI engine: splicing against ComfyUI's SD1 tokenizer and CLIP,
the loader through the registered model folder, and the shipped workflow end to end."""
from __future__ import annotations

import pytest
import torch
from engine_calls import call

WORKFLOW = "Subject - zero-shot subject-driven generation (BLIP-Diffusion)"
FAST = {"steps": 3, "width": 64, "height": 64}
PROMPT = "swimming underwater"


@pytest.fixture(scope="module")
def subject_folder(engine):
    """A random subject encoder in the real layout, in the registered models/blip_diffusion folder."""
    import folder_paths
    from editlab.headless.examples_subject import SUBJECT_FOLDER
    from random_subject_encoder import write_subject_encoder_folder

    base = engine.root / "models" / "blip_diffusion"
    if not (base / SUBJECT_FOLDER).exists():
        write_subject_encoder_folder(base / SUBJECT_FOLDER, seed=0, width=768)
    folder_paths.add_model_folder_path("blip_diffusion", str(base), is_default=True)
    return SUBJECT_FOLDER


@pytest.fixture(scope="module")
def subject(subject_folder, engine):
    from editlab.nodes.subject import subject_folders
    assert subject_folder in subject_folders()
    (encoder,) = call("EditLabSubjectEncoderLoader", folder=subject_folder)
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    (subj,) = call("EditLabSubjectEncode", subject_encoder=encoder, image=image, class_word="dog")
    return subj


def _encode(clip, tokens):
    with torch.inference_mode():
        return clip.encode_from_tokens_scheduled(tokens)[0][0]


def test_loader_is_managed_and_encode_is_deterministic(subject_folder, subject):
    import comfy.model_patcher
    (encoder,) = call("EditLabSubjectEncoderLoader", folder=subject_folder)
    assert isinstance(encoder.patcher, comfy.model_patcher.ModelPatcher)
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    (again,) = call("EditLabSubjectEncode", subject_encoder=encoder, image=image, class_word="dog")
    (other,) = call("EditLabSubjectEncode", subject_encoder=encoder, image=torch.rand(1, 64, 64, 3), class_word="dog")
    assert subject.embeds.shape == (16, 768) and subject.class_word == "dog"
    assert torch.equal(subject.embeds, again.embeds)
    assert (subject.embeds - other.embeds).abs().max() > 1e-3
    (both,) = call("EditLabSubjectEncode", subject_encoder=encoder, image=torch.cat([image, image]), class_word="dog")
    assert torch.allclose(both.embeds, subject.embeds, atol=1e-5)  # a batch is averaged


def test_splice_lands_at_reference_position(sd15, subject):
    from editlab.guidance.subject import build_prompt
    from editlab.nodes.subject import subject_tokens
    _model, clip, _vae = sd15
    text = build_prompt(PROMPT, "dog")
    tokens, report = subject_tokens(clip, subject, text)
    row = tokens["l"][0]
    assert len(tokens["l"]) == 1 and len(row) == 77
    plain = [t for chunk in clip.tokenize(text, return_word_ids=True)["l"] for (t, _w, word) in chunk if word != 0]
    tok = clip.tokenizer.clip_l
    assert row[0][0] == tok.start_token and row[1][0] == plain[0]  # BOS, "a"
    for i in range(16):
        assert torch.equal(row[2 + i][0], subject.embeds[i])
    assert [t for t, _ in row[18:76]] == plain[1:59] and row[76][0] == tok.end_token
    assert "59 of" in report and "truncated" in report


def test_subject_vectors_enter_before_position_embeddings(sd15, subject):
    """Splicing CLIP's own token embeddings of 16 tokens must equal encoding those tokens as ids."""
    from editlab.guidance.subject import Subject
    from editlab.nodes.subject import subject_tokens
    _model, clip, _vae = sd15
    text = "a dog " + PROMPT
    ids = [t for t, _ in clip.tokenize("a " + "cat " * 16)["l"][0][2:18]]
    table = clip.cond_stage_model.clip_l.transformer.get_input_embeddings().weight.detach().float().cpu()
    fake = Subject(table[ids].clone(), "dog")
    tokens, _ = subject_tokens(clip, fake, text)
    as_ids = [(t if torch.is_tensor(t) is False else ids[i - 2], w) for i, (t, w) in enumerate(tokens["l"][0])]
    assert torch.allclose(_encode(clip, tokens), _encode(clip, {"l": [as_ids]}), atol=1e-4)


def test_subject_prompt_node_positive_negative(sd15, subject):
    _model, clip, _vae = sd15
    positive, negative, report = call("EditLabSubjectPrompt", clip=clip, subject=subject, prompt=PROMPT,
                                      target_class="", prompt_strength=1.0, prompt_reps=20, negative_prompt="blurry")
    plain = _encode(clip, clip.tokenize("a dog " + PROMPT))
    assert positive[0][0].shape == (1, 77, 768)
    # causal text encoder: BOS and "a" are untouched by the subject that follows them
    assert torch.allclose(positive[0][0][:, :2], plain[:, :2], atol=1e-5)
    assert (positive[0][0][:, 2:18] - plain[:, 2:18]).abs().max() > 1e-3
    assert torch.equal(negative[0][0], _encode(clip, clip.tokenize("blurry")))  # no subject in the negative
    assert "16 vectors at position 2" in report


def test_bad_inputs(sd15, subject):
    from editlab.guidance.subject import Subject
    _model, clip, _vae = sd15
    with pytest.raises(ValueError, match="32 wide"):
        call("EditLabSubjectPrompt", clip=clip, subject=Subject(torch.zeros(16, 32), "dog"), prompt=PROMPT,
             target_class="", prompt_strength=1.0, prompt_reps=20, negative_prompt="")
    with pytest.raises(ValueError, match="repetitions"):
        call("EditLabSubjectPrompt", clip=clip, subject=subject, prompt=PROMPT, target_class="",
             prompt_strength=0.0, prompt_reps=20, negative_prompt="")
    with pytest.raises(ValueError, match="not found"):
        call("EditLabSubjectEncoderLoader", folder="no-such-folder")
    (mixed,) = call("EditLabSubjectMix", subject_a=subject, weight_a=0.5, subject_b=subject, weight_b=0.5,
                    class_word="")
    assert torch.allclose(mixed.embeds, subject.embeds) and mixed.class_word == "dog"


def test_loader_is_confined_to_the_registered_folders(engine, subject_folder, tmp_path):
    """Every folder name resolves (realpath) inside a registered blip_diffusion folder. Policy: a symlink
    is followed, and accepted only when its target also lies inside a registered folder."""
    import shutil

    from editlab.nodes.subject import subject_folders
    base = engine.root / "models" / "blip_diffusion"
    outside = tmp_path / "elsewhere" / "release"
    shutil.copytree(base / subject_folder, outside)  # a complete release folder, outside every registered one
    escape, alias = base / "editlab_escape", base / "editlab_alias"
    escape.symlink_to(outside, target_is_directory=True)
    alias.symlink_to(base / subject_folder, target_is_directory=True)
    try:
        refused = [f"../blip_diffusion/{subject_folder}", f"../../models/blip_diffusion/{subject_folder}",
                   f"{subject_folder}/../{subject_folder}", str(outside), str(base / subject_folder), "/", "..",
                   "", escape.name]
        for name in refused:
            with pytest.raises(ValueError, match="blip_diffusion") as err:
                call("EditLabSubjectEncoderLoader", folder=name)
            assert repr(name) in str(err.value), name
        assert escape.name not in subject_folders() and alias.name in subject_folders()
        (loaded,) = call("EditLabSubjectEncoderLoader", folder=alias.name)  # resolves inside: allowed
        assert loaded.width == 768
    finally:
        escape.unlink()
        alias.unlink()


def test_workflow_runs(engine, subject_folder):
    prompt = engine.prompt(WORKFLOW, **FAST)
    result = engine.run(prompt)
    assert result.images
    sampler = [k for k, v in prompt.items() if v["class_type"] == "KSampler"][0]
    assert torch.isfinite(result.node_output(sampler)[0][0]["samples"]).all()


# -- subject-driven editing (inversion + refine + local blend) ---------------------------------------

EDIT_WORKFLOW = "Subject - edit a real photo (BLIP-Diffusion + inversion + Prompt-to-Prompt)"


def test_edit_pair_rows_are_the_photo_prompt_and_the_reference_subject_prompt(sd15, subject):
    """Row 0 is exactly CLIPTextEncode(source); for a source 'a dog ...' row 1 is exactly Subject Prompt's
    reference positive (subject after BOS and 'a', one repetition) — the subject sits where BLIP-Diffusion
    puts it, and the edit's maps shift every later word by the 16 vectors."""
    import nodes
    _model, clip, _vae = sd15
    source = "a dog sitting on the grass"
    cond, edit, report = call("EditLabSubjectEditPair", clip=clip, subject=subject, source=source, subject_word="",
                              target_class="", local_blend=True, subject_weight=1.0)
    rows = cond[0][0]
    assert rows.shape == (2, 77, 768)
    with torch.inference_mode():
        plain = nodes.CLIPTextEncode().encode(clip, source)[0][0][0]
    assert torch.equal(rows[:1], plain)
    reference, _neg, _r = call("EditLabSubjectPrompt", clip=clip, subject=subject, prompt="sitting on the grass",
                               target_class="", prompt_strength=1.0, prompt_reps=1, negative_prompt="")
    assert torch.equal(rows[1:], reference[0][0])
    assert "positions 2-17" in report
    labels = dict(edit.labels(1))
    assert labels["<subject>"] == list(range(2, 18)) and labels["dog"] == [18]
    assert dict(edit.labels(0))["dog"] == [2]
    with pytest.raises(ValueError, match="not in the source prompt"):
        call("EditLabSubjectEditPair", clip=clip, subject=subject, source="a photo of a lake", subject_word="",
             target_class="", local_blend=True, subject_weight=1.0)


def test_subject_edit_workflow_keeps_the_photo_and_changes_the_subject_region(engine, subject_folder):
    prompt = engine.prompt(EDIT_WORKFLOW, steps=4)
    result = engine.run(prompt)
    psnr_id = next(k for k, v in prompt.items() if v["class_type"] == "EditLabReconstructionPSNR")
    sampled = next(k for k, v in prompt.items() if v["class_type"] == "SamplerCustomAdvanced")
    rows = result.node_output(sampled)[0][0]["samples"]
    assert result.node_output(psnr_id)[0][0] > 90  # direct inversion: the source row is the photo
    assert rows.shape[0] == 2 and not torch.allclose(rows[0], rows[1], atol=1e-3)  # the target is an edit
    assert len(result.images) == 4  # the pair, decoded, and the attention maps of both rows


def test_subject_edit_local_blend_keeps_the_outside_of_the_subject(sd15, subject):
    """Local blend on the subject word and vectors: where neither attends, the target row is the source row."""
    import comfy.samplers
    import comfy_extras.nodes_custom_sampler as cs

    import nodes
    model, clip, _vae = sd15
    cond, edit, _r = call("EditLabSubjectEditPair", clip=clip, subject=subject, source="a dog sitting on the grass",
                          subject_word="dog", target_class="cat", local_blend=True, subject_weight=1.0)
    (controlled,) = call("EditLabAttentionController", model=model, edit=edit, cross_replace_steps=0.8,
                         self_replace_steps=0.4, self_attention_max_size=16, map_size=8, blend_threshold=0.999,
                         start_blend=0.0)
    (latent,) = call("EditLabP2PLatentBatch", latent={"samples": torch.zeros(1, 4, 8, 8)}, edit=edit)
    with torch.inference_mode():
        negative = nodes.CLIPTextEncode().encode(clip, "")[0]
        guider = cs.CFGGuider().get_guider(controlled, cond, negative, 5.0)[0]
        sigmas = cs.BasicScheduler().get_sigmas(model, "normal", 4, 1.0)[0]
        out = cs.SamplerCustomAdvanced().sample(cs.Noise_RandomNoise(5), guider, comfy.samplers.sampler_object("euler"),
                                                sigmas, latent)[0]["samples"]
    mask = controlled.model_options["transformer_options"]["editlab_p2p"].maps_for(out).mask
    outside = (mask[1, 0] == 0).expand_as(out[1])
    assert outside.any() and (~outside).any()
    assert torch.equal(out[1][outside], out[0][outside])
    assert not torch.allclose(out[1][~outside], out[0][~outside], atol=1e-4)


def test_requeue_does_not_re_encode_the_subject(engine, subject_folder, monkeypatch):
    """ComfyUI's output cache (one executor per session, as the server keeps): re-queuing the graph, or
    changing only what is downstream of the subject (the seed), does not run the encoder again; a new
    subject photo does."""
    import sys

    import nodes
    # the engine's own copy of the pack (ComfyUI imports it under its folder name)
    engine_module = sys.modules[nodes.NODE_CLASS_MAPPINGS["EditLabSubjectEncode"].__module__]
    SubjectEncoderModel = engine_module.SubjectEncoderModel
    calls = []
    original = SubjectEncoderModel.encode

    def counting(self, image, class_word):
        calls.append(class_word)
        return original(self, image, class_word)

    monkeypatch.setattr(SubjectEncoderModel, "encode", counting)
    executor = engine.runner.new_executor()
    prompt = engine.prompt(WORKFLOW, **FAST)
    engine.run(prompt, executor=executor)
    engine.run(prompt, executor=executor)
    assert len(calls) == 1
    sampler = next(k for k, v in prompt.items() if v["class_type"] == "KSampler")
    prompt[sampler]["inputs"]["seed"] += 1
    again = engine.run(prompt, executor=executor)
    assert len(calls) == 1 and again.images
    encode = next(k for k, v in prompt.items() if v["class_type"] == "EditLabSubjectEncode")
    prompt[encode]["inputs"]["class_word"] = "puppy"
    engine.run(prompt, executor=executor)
    assert calls == ["dog", "puppy"]
