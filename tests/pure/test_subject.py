"""BLIP-Diffusion subject encoder (docs/methods.md §7): loading the real on-disk layout, encoding, prompts, splicing."""
from __future__ import annotations

import json
import os

import pytest
import torch

from editlab.errors import EditLabError
from editlab.guidance import subject as S
from random_subject_encoder import release_key_shapes, tiny_configs, write_subject_encoder_folder

WIDTH = 48  # a shrunken Q-Former width for the pure tier (the engine tier uses CLIP's 768)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_subject_encoder_folder(tmp_path_factory.mktemp("bd") / "blipdiffusion", seed=0, width=WIDTH)


@pytest.fixture(scope="module")
def encoder(folder):
    return S.load_subject_encoder(str(folder))


def _images(seed: int, n: int = 1, h: int = 40, w: int = 52) -> torch.Tensor:
    return torch.rand(n, h, w, 3, generator=torch.Generator().manual_seed(seed))


def _encode(enc, images, word="dog"):
    with torch.no_grad():
        return enc.model(S.preprocess(images, enc.preprocess), enc.class_ids(word))


def test_real_layout_loads_strictly(folder, encoder):
    """The file is written from the release's own key list (tests/support, not from our module); the
    loader (strict: it refuses any missing, unexpected or mis-shaped key) takes every tensor as it is."""
    from safetensors.torch import load_file
    on_disk = load_file(str(folder / "qformer" / "model.safetensors"))
    assert {k: tuple(v.shape) for k, v in on_disk.items()} == release_key_shapes(tiny_configs(WIDTH))
    assert "embeddings.position_ids" in on_disk  # transformers saves the buffer; we ignore it by name
    loaded = encoder.model.state_dict()
    assert set(loaded) == set(on_disk) - {"embeddings.position_ids"}
    for name, tensor in loaded.items():
        assert torch.equal(tensor, on_disk[name]), name
    cfg = json.loads((folder / "qformer" / "config.json").read_text())
    assert {"vision_config", "qformer_config", "num_query_tokens"} <= set(cfg)
    assert encoder.model.config.num_query_tokens == 16
    assert encoder.preprocess == S.Preprocess(224, S.OPENAI_CLIP_MEAN, S.OPENAI_CLIP_STD)


def test_the_release_key_list_is_that_of_the_reference_qformer(folder):
    """The hand-written release key list against diffusers' Blip2QFormerModel built from the same config."""
    ref_mod = pytest.importorskip("diffusers.pipelines.deprecated.blip_diffusion.modeling_blip2",
                                  reason="diffusers (optional) is not installed: no reference Q-Former to compare with")
    from transformers import Blip2Config
    for cfgs in (tiny_configs(WIDTH), {**tiny_configs(WIDTH), "qformer_config": {
            **tiny_configs(WIDTH)["qformer_config"], "num_hidden_layers": 2, "cross_attention_frequency": 2}}):
        config = Blip2Config(**cfgs)
        config.tokenizer = str(folder / "qformer")  # its BERT tokenizer from our local vocab.txt, no download
        ref = ref_mod.Blip2QFormerModel(config)
        assert {k: tuple(v.shape) for k, v in ref.state_dict().items()} == release_key_shapes(cfgs)


def test_reference_parameter_names():
    """The names of diffusers' Blip2QFormerModel (the release's qformer/), per its conversion script."""
    keys = set(S.SubjectEncoder(S.SubjectEncoderConfig(
        vision=S.VisionConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1),
        qformer=S.QFormerConfig(vocab_size=10, hidden_size=8, num_hidden_layers=2, num_attention_heads=1,
                                intermediate_size=8, max_position_embeddings=8, cross_attention_frequency=2,
                                encoder_hidden_size=8))).state_dict())
    for key in ["embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
                "embeddings.LayerNorm.weight", "query_tokens", "proj_layer.dense1.weight", "proj_layer.dense2.bias",
                "proj_layer.LayerNorm.bias", "encoder.layer.0.attention.attention.query.weight",
                "encoder.layer.0.attention.output.LayerNorm.weight", "encoder.layer.0.crossattention.attention.key.weight",
                "encoder.layer.0.intermediate_query.dense.weight", "encoder.layer.0.output_query.LayerNorm.bias",
                "encoder.layer.1.intermediate.dense.weight", "encoder.layer.1.output.dense.weight",
                "visual_encoder.embeddings.class_embedding", "visual_encoder.embeddings.position_embedding",
                "visual_encoder.embeddings.patch_embedding.weight", "visual_encoder.pre_layernorm.weight",
                "visual_encoder.encoder.layers.0.self_attn.qkv.weight", "visual_encoder.encoder.layers.0.self_attn.qkv.bias",
                "visual_encoder.encoder.layers.0.self_attn.projection.weight", "visual_encoder.encoder.layers.0.mlp.fc1.weight",
                "visual_encoder.encoder.layers.0.layer_norm2.bias", "visual_encoder.post_layernorm.weight"]:
        assert key in keys, key
    assert "encoder.layer.1.crossattention.attention.key.weight" not in keys  # cross-attention every 2nd layer here
    assert "visual_encoder.embeddings.patch_embedding.bias" not in keys


def test_old_qkv_bias_naming_is_accepted(encoder):
    sd = dict(encoder.model.state_dict())
    bias = sd.pop("visual_encoder.encoder.layers.0.self_attn.qkv.bias")
    c = bias.shape[0] // 3
    sd["visual_encoder.encoder.layers.0.self_attn.q_bias"] = bias[:c]
    sd["visual_encoder.encoder.layers.0.self_attn.v_bias"] = bias[2 * c:]
    out = S.convert_state_dict(sd)["visual_encoder.encoder.layers.0.self_attn.qkv.bias"]
    assert torch.equal(out[:c], bias[:c]) and torch.equal(out[2 * c:], bias[2 * c:]) and not out[c:2 * c].any()


def test_missing_files_name_folder_and_files(tmp_path, folder):
    with pytest.raises(EditLabError, match="qformer/config.json"):
        S.find_subject_files(str(tmp_path))
    broken = tmp_path / "broken"
    (broken / "qformer").mkdir(parents=True)
    (broken / "qformer" / "config.json").write_text((folder / "qformer" / "config.json").read_text())
    with pytest.raises(EditLabError) as err:
        S.find_subject_files(str(broken))
    assert str(broken) in str(err.value) and "model.safetensors" in str(err.value)


def test_truncated_weights_name_the_file_and_the_fix(tmp_path, folder):
    import shutil
    broken = tmp_path / "truncated"
    shutil.copytree(folder, broken)
    weights = broken / "qformer" / "model.safetensors"
    data = weights.read_bytes()
    for cut in (len(data) // 2, 4):  # an interrupted download: cut in the tensors, and in the header
        weights.write_bytes(data[:cut])
        with pytest.raises(EditLabError) as err:
            S.load_subject_encoder(str(broken))
        msg = str(err.value)
        assert str(weights) in msg and "download" in msg and "incomplete" in msg, msg
    # the same for a torch pickle (read with weights_only)
    from safetensors.torch import load_file
    pickled = broken / "qformer" / "pytorch_model.bin"
    torch.save(load_file(str(folder / "qformer" / "model.safetensors")), str(pickled))
    weights.unlink()
    pickled.write_bytes(pickled.read_bytes()[:1000])
    with pytest.raises(EditLabError, match="pytorch_model.bin .*incomplete"):
        S.load_subject_encoder(str(broken))


def test_mismatched_weights_are_reported(tmp_path, folder, encoder):
    sd = {k: v.clone() for k, v in encoder.model.state_dict().items()}
    sd.pop("query_tokens")
    sd["extra.weight"] = torch.zeros(1)
    sd["proj_layer.dense1.weight"] = torch.zeros(3, 3)
    with pytest.raises(EditLabError) as err:
        S.load_weights(S.SubjectEncoder(encoder.model.config), sd, "somewhere")
    msg = str(err.value)
    assert "missing keys: query_tokens" in msg and "unexpected keys: extra.weight" in msg and "proj_layer.dense1" in msg


def test_encode_shapes_determinism_and_image_dependence(encoder):
    a1 = _encode(encoder, _images(1))
    a2 = _encode(encoder, _images(1))
    b = _encode(encoder, _images(2))
    assert a1.shape == (1, 16, WIDTH) and torch.isfinite(a1).all()
    assert torch.equal(a1, a2)
    assert (a1 - b).abs().max() > 1e-3
    assert (a1 - _encode(encoder, _images(1), "cat")).abs().max() > 1e-3  # the class word is read too


def test_batch_is_encoded_per_image(encoder):
    both = _encode(encoder, torch.cat([_images(1), _images(2)]))
    assert torch.allclose(both[0], _encode(encoder, _images(1))[0], atol=1e-5)
    assert torch.allclose(both[1], _encode(encoder, _images(2))[0], atol=1e-5)


def test_projection_is_the_reference_residual_mlp():
    proj = S.Projection(6)
    for p in proj.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(2, 3, 6)
    h = torch.nn.functional.layer_norm(x, (6,), proj.LayerNorm.weight, proj.LayerNorm.bias, 1e-12)
    h = proj.dense1(h)
    ref = proj.dense2(h * torch.sigmoid(1.702 * h)) + x
    assert torch.allclose(proj(x), ref, atol=1e-6)


def test_preprocess_size_normalisation_and_bad_images():
    spec = S.Preprocess()
    grey = torch.full((1, 30, 30, 1), 0.5)
    out = S.preprocess(grey, spec)
    assert out.shape == (1, 3, 224, 224)
    expected = (0.5 - torch.tensor(S.OPENAI_CLIP_MEAN)) / torch.tensor(S.OPENAI_CLIP_STD)
    assert torch.allclose(out[0, :, 100, 100], expected, atol=1e-5)
    rgba = torch.rand(1, 20, 20, 4)
    assert torch.equal(S.preprocess(rgba, spec), S.preprocess(rgba[..., :3], spec))
    with pytest.raises(EditLabError, match="too small"):
        S.preprocess(torch.rand(1, 8, 64, 3), spec)
    with pytest.raises(EditLabError, match="channels"):
        S.preprocess(torch.rand(1, 32, 32, 2), spec)


def test_empty_class_word(encoder):
    with pytest.raises(EditLabError, match="class word is empty"):
        encoder.class_ids("  ")
    with pytest.raises(EditLabError, match="target class"):
        S.build_prompt("on a beach", "")


def test_reference_prompt():
    assert S.build_prompt(" swimming ", "dog", 1.0, 3) == "a dog swimming, a dog swimming, a dog swimming"
    assert S.build_prompt("x", "cat", 0.5, 20).count("a cat x") == 10
    with pytest.raises(EditLabError, match="repetitions"):
        S.build_prompt("x", "cat", 0.0, 20)


def test_splice_plan_position_length_and_budget():
    content = list(range(100, 200))  # 100 content tokens: more than the 59 that fit
    plan = S.plan_splice(content, 16, start=1, end=2, pad=3)
    assert len(plan.items) == 77
    assert plan.items[0] == 1 and plan.items[1] == 100
    assert plan.items[2:18] == tuple(("subject", i) for i in range(16))
    assert list(plan.items[18:76]) == content[1:59] and plan.items[76] == 2
    assert plan.kept == 59 and plan.dropped == 41
    short = S.plan_splice([100, 101, 102], 16, start=1, end=2, pad=3)
    assert short.items[:2] == (1, 100) and short.items[18:21] == (101, 102, 2)
    assert set(short.items[21:]) == {3} and len(short.items) == 77 and short.dropped == 0


def test_mix_subjects():
    a = S.Subject(torch.zeros(16, 4), "dog", "a")
    b = S.Subject(torch.ones(16, 4), "cat", "b")
    m = S.mix_subjects([a, b], [1.0, 3.0])
    assert torch.allclose(m.embeds, torch.full((16, 4), 0.75)) and m.class_word == "cat"
    assert S.mix_subjects([a, b], [1.0, 0.0], "toy").class_word == "toy"
    assert torch.equal(S.mix_subjects([a, b], [1.0, 0.0]).embeds, a.embeds)
    with pytest.raises(EditLabError, match="positive sum"):
        S.mix_subjects([a, b], [0.0, 0.0])
    with pytest.raises(EditLabError, match="different shapes"):
        S.mix_subjects([a, S.Subject(torch.ones(16, 5), "x")], [1.0, 1.0])


@pytest.mark.skipif(not os.environ.get("EDITLAB_BLIP_DIFFUSION"),
                    reason="opt-in: set EDITLAB_BLIP_DIFFUSION to a local BLIP-Diffusion release folder "
                           "(diffusers layout) to check the real weights load strictly")
def test_real_release_loads_strictly():
    enc = S.load_subject_encoder(os.environ["EDITLAB_BLIP_DIFFUSION"])  # strict: raises on any key mismatch
    assert enc.model.config.num_query_tokens == 16 and enc.model.width == 768
    out = _encode(enc, _images(0, h=224, w=224))
    assert out.shape == (1, 16, 768) and torch.isfinite(out).all()


def test_parity_with_the_reference_qformer_on_the_same_weights(folder, encoder):
    """The release's qformer/ is diffusers' Blip2QFormerModel: built from the same config.json it takes our
    weights file with no missing or unexpected key, and its forward - replayed from its own modules - gives
    the same 16 subject embeddings. Its own forward no longer runs against current transformers, so the
    Q-Former layers are transformers' maintained Blip2QFormerLayer loaded with the reference's weights;
    embeddings, vision encoder, projection and the class-word tokenizer are the reference's own.
    (diffusers' deprecated BLIP-Diffusion code is only the oracle here; EditLab does not import it.)"""
    ref_mod = pytest.importorskip("diffusers.pipelines.deprecated.blip_diffusion.modeling_blip2",
                                  reason="diffusers (optional) is not installed: no reference Q-Former to compare with")
    from safetensors.torch import load_file
    from transformers import Blip2Config
    from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerLayer
    config = Blip2Config.from_json_file(str(folder / "qformer" / "config.json"))
    config.tokenizer = str(folder / "qformer")  # its BERT tokenizer from our local vocab.txt, no download
    ref = ref_mod.Blip2QFormerModel(config).eval()
    missing, unexpected = ref.load_state_dict(load_file(str(folder / "qformer" / "model.safetensors")), strict=False)
    assert not missing and not unexpected, (missing, unexpected)

    qcfg = config.qformer_config
    qcfg._attn_implementation, qcfg.use_qformer_text_input = "eager", True
    layers = []
    for i, ref_layer in enumerate(ref.encoder.layer):
        layer = Blip2QFormerLayer(qcfg, i).eval()
        layer.load_state_dict(ref_layer.state_dict(), strict=True)
        layers.append(layer)

    pixels = S.preprocess(_images(3, n=2), encoder.preprocess)
    ids = ref.tokenizer(["dog", "dog"], return_tensors="pt", padding=True).input_ids
    assert torch.equal(ids[:1], encoder.class_ids("dog"))
    n = config.num_query_tokens
    with torch.no_grad():
        image = ref.visual_encoder(pixels).last_hidden_state
        x = ref.embeddings(input_ids=ids, query_embeds=ref.query_tokens)
        for layer in layers:
            out = layer(x, encoder_hidden_states=image, query_length=n)
            x = out[0] if isinstance(out, tuple) else out
        theirs = ref.proj_layer(x[:, :n])
        ours = encoder.model(pixels, encoder.class_ids("dog"))
    assert ours.shape == theirs.shape == (2, 16, WIDTH)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    assert (ours[0] - ours[1]).abs().max() > 1e-3  # two different images: not a vacuous match
