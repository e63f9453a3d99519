"""Metric model folders: the real on-disk layouts, clear errors, a per-process cache, and no network ever."""
from __future__ import annotations

import json
import os
import shutil
import socket

import pytest
import torch

import random_metric_models as rmm
from editlab.errors import EditLabError
from editlab.metrics import edit, embed, kid, models


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("editlab_metrics")
    rmm.write_default_set(root)
    return root


def test_missing_model_names_the_folders_searched_and_the_files_expected(tmp_path):
    with pytest.raises(EditLabError) as err:
        models.load_clip("clip-vit-large-patch14", [str(tmp_path / "a"), str(tmp_path / "b")])
    msg = str(err.value)
    assert str(tmp_path / "a" / "clip-vit-large-patch14") in msg and str(tmp_path / "b") in msg
    assert "model.safetensors" in msg and "vocab.json" in msg and "openai/clip-vit-large-patch14" in msg


def test_missing_files_and_wrong_layouts_are_named(folder, tmp_path):
    broken = tmp_path / "clip"
    shutil.copytree(folder / "clip-vit-large-patch14", broken)
    os.remove(broken / "model.safetensors")
    with pytest.raises(EditLabError, match="lacks model.safetensors or pytorch_model.bin"):
        models.load_clip("clip", [str(tmp_path)])
    # a DINO folder given where CLIP is expected
    with pytest.raises(EditLabError, match="holds a 'vit' model; expected clip"):
        models.load_clip("dino-vits16", [str(folder)])
    with pytest.raises(EditLabError, match="squeezenet1_1-b8a52dc0.pth"):
        models.load_lpips("squeeze", [str(tmp_path)], name="clip")
    with pytest.raises(EditLabError, match="alexnet-owt-7be5be79.pth"):
        models.load_lpips("alex", [str(folder)])
    with pytest.raises(EditLabError, match="leaves the model folder"):
        models.load_vit("dino", "../elsewhere", [str(folder)])
    with pytest.raises(EditLabError, match="inception_v3_google"):
        models.load_inception([str(folder)], name="lpips")


def test_models_are_cached_per_process_and_reloaded_when_the_files_change(folder, tmp_path):
    shutil.copytree(folder / "dino-vits16", tmp_path / "dino")
    a = models.load_vit("dino", "dino", [str(tmp_path)])
    assert models.load_vit("dino", "dino", [str(tmp_path)]) is a
    rmm.write_vit(tmp_path / "dino", seed=7)  # new weights, new file times
    st = os.stat(tmp_path / "dino" / "model.safetensors")
    os.utime(tmp_path / "dino" / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    b = models.load_vit("dino", "dino", [str(tmp_path)])
    assert b is not a
    x = torch.rand(1, 3, 32, 32)
    assert not torch.allclose(embed.dino_embeds(a, x), embed.dino_embeds(b, x))


def test_two_seeds_give_different_models(tmp_path):
    rmm.write_vit(tmp_path / "v0", seed=0)
    rmm.write_vit(tmp_path / "v1", seed=1)
    x = torch.rand(2, 3, 32, 32)
    e0 = embed.dino_embeds(models.load_vit("dino", "v0", [str(tmp_path)]), x)
    e1 = embed.dino_embeds(models.load_vit("dino", "v1", [str(tmp_path)]), x)
    assert not torch.allclose(e0, e1)


def test_every_metric_runs_with_no_network(folder, monkeypatch):
    def refuse(*_a, **_k):
        raise AssertionError("a metric touched the network")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    models.clear_cache()
    dirs = [str(folder)]
    loaded = edit.EditModels(models.load_clip("clip-vit-large-patch14", dirs), models.load_vit("structure", "dino-vitb8", dirs),
                             models.load_lpips("squeeze", dirs))
    src, out = torch.rand(2, 40, 40, 3), torch.rand(2, 40, 40, 3)
    mask = torch.zeros(2, 40, 40)
    mask[:, 10:30, 10:30] = 1
    for compat in (False, True):
        rows = edit.edit_metrics(src, out, mask, ["a [cat]", "a dog"], loaded, compat=compat)
        assert len(rows) == 2 and set(rows[0]) == set(edit.EDIT_KEYS)
    rows = edit.subject_metrics(out, src[:1], "a dog", loaded.clip, models.load_vit("dino", "dino-vits16", dirs))
    assert all(-1 <= r[k] <= 1 for r in rows for k in edit.SUBJECT_KEYS)


def test_inception_loads_from_torchvisions_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda *a, **k: pytest.fail("download"))
    rmm.write_inception(tmp_path / "inception")
    net = models.load_inception([str(tmp_path)])
    f = kid.features(net.module, torch.rand(2, 3, 32, 32))
    assert f.shape == (2, 2048) and torch.isfinite(f).all()
    assert "torchvision" in net.label


def test_preprocessor_config_is_read(folder, tmp_path):
    shutil.copytree(folder / "dino-vits16", tmp_path / "d")
    cfg = json.loads((tmp_path / "d" / "preprocessor_config.json").read_text())
    cfg["image_mean"] = [0.0, 0.0, 0.0]
    (tmp_path / "d" / "preprocessor_config.json").write_text(json.dumps(cfg))
    assert models.load_vit("dino", "d", [str(tmp_path)]).image_cfg["image_mean"] == [0.0, 0.0, 0.0]


def test_a_bare_size_number_follows_transformers(folder, tmp_path):
    # ViTImageProcessor reads "size": 224 as a 224x224 square, CLIPImageProcessor as the shorter side.
    shutil.copytree(folder / "dino-vits16", tmp_path / "v")
    shutil.copytree(folder / "clip-vit-large-patch14", tmp_path / "c")
    for name in ("v", "c"):
        file = tmp_path / name / "preprocessor_config.json"
        cfg = json.loads(file.read_text())
        cfg["size"] = 24
        file.write_text(json.dumps(cfg))
    assert models.load_vit("dino", "v", [str(tmp_path)]).image_cfg["size"] == {"height": 24, "width": 24}
    assert models.load_clip("c", [str(tmp_path)]).image_cfg["size"] == {"shortest_edge": 24}
    x = torch.rand(1, 3, 30, 40)
    assert embed.preprocess(x, models.load_vit("dino", "v", [str(tmp_path)]).image_cfg).shape[-2:] == (24, 24)
