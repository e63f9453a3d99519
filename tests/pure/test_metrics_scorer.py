"""The scorer on tiny synthetic datasets: pairs (with resume), pie-bench and dreambench layouts."""
from __future__ import annotations

import csv
import json
import math
import os

import numpy as np
import pytest
from PIL import Image

import random_metric_models as rmm
from editlab.metrics import datasets, scorer

N = 7


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("editlab_metrics")
    rmm.write_default_set(root)
    return str(root)


def _save(path, arr):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path)


@pytest.fixture()
def pairs(tmp_path):
    rng = np.random.default_rng(0)
    lines = ["id,source,edited,prompt,mask,category"]
    for i in range(N):
        h = 32 if i != 3 else 40  # one row of another size: its own batch
        src = (rng.random((h, 32, 3)) * 255).astype(np.uint8)
        out = src.copy()
        out[8:16, 8:24] = 200 + i
        mask = np.zeros((h, 32), np.uint8)
        mask[8:16, 8:24] = 255
        _save(tmp_path / "img" / f"s{i}.png", src)
        _save(tmp_path / "img" / f"e{i}.png", out)
        mask_col = "" if i == 5 else f"img/m{i}.png"
        if mask_col:
            _save(tmp_path / "img" / f"m{i}.png", mask)
        lines.append(f"r{i},img/s{i}.png,img/e{i}.png,a [cat] {i},{mask_col},{'odd' if i % 2 else 'even'}")
    (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n")
    return tmp_path / "pairs.csv"


def _argv(pairs_csv, out, model_dir, *extra):
    return ["--layout", "pairs", "--data", str(pairs_csv), "--out", str(out), "--models", model_dir,
            "--batch", "3", "--no-progress", "--lpips-net", "squeeze", *extra]


def _read(path):
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


def test_pairs_scores_every_row_and_summarises_per_category(pairs, tmp_path, model_dir):
    assert scorer.main(_argv(pairs, tmp_path / "out", model_dir)) == 0
    rows = _read(tmp_path / "out" / "scores.csv")
    assert rows[0] == ["id", "category", "structure_distance", "psnr", "lpips", "mse", "ssim", "clip_whole", "clip_edited"]
    assert [r[0] for r in rows[1:]] == [f"r{i}" for i in range(N)]
    by_id = {r[0]: dict(zip(rows[0], r)) for r in rows[1:]}
    assert float(by_id["r0"]["psnr"]) == math.inf  # the edit stays inside its mask: the background is unchanged
    assert float(by_id["r5"]["psnr"]) < 100  # no mask: the whole image, edit included
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| even | 4 |" in summary and "| odd | 3 |" in summary and "| all | 7 |" in summary


def test_an_interrupted_run_resumes_to_the_same_csv(pairs, tmp_path, model_dir, monkeypatch):
    assert scorer.main(_argv(pairs, tmp_path / "full", model_dir)) == 0
    calls = {"n": 0}
    real = scorer.Scorer.score

    def dies_on_the_third_block(self, block):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, block)

    monkeypatch.setattr(scorer.Scorer, "score", dies_on_the_third_block)
    with pytest.raises(KeyboardInterrupt):
        scorer.main(_argv(pairs, tmp_path / "part", model_dir))
    assert len(_read(tmp_path / "part" / "scores.csv")) == 1 + 6  # two blocks of three were written
    with open(tmp_path / "part" / "scores.csv", "a") as fh:
        fh.write("r6,even,0.1,2")  # a torn line, as a kill mid-write leaves
    monkeypatch.setattr(scorer.Scorer, "score", real)
    seen = []
    monkeypatch.setattr(scorer.Scorer, "score", lambda self, block: seen.extend(r.id for r in block) or real(self, block))
    assert scorer.main(_argv(pairs, tmp_path / "part", model_dir)) == 0
    assert seen == ["r6"]  # only the unscored row ran
    assert _read(tmp_path / "part" / "scores.csv") == _read(tmp_path / "full" / "scores.csv")
    assert (tmp_path / "part" / "summary.md").read_text() == (tmp_path / "full" / "summary.md").read_text()


def test_bad_inputs_are_one_line_errors(pairs, tmp_path, model_dir, capsys):
    assert scorer.main(_argv(pairs, tmp_path / "o", model_dir, "--metrics", "psnr,fid")) == 2
    assert "fid" in capsys.readouterr().err
    assert scorer.main(_argv(pairs, tmp_path / "o2", str(tmp_path / "nowhere"))) == 2
    assert "not found; searched" in capsys.readouterr().err
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    assert scorer.main(_argv(tmp_path / "bad.csv", tmp_path / "o3", model_dir)) == 2
    assert "missing column" in capsys.readouterr().err


def test_pie_bench_layout_decodes_the_mask_and_uses_the_editing_type(tmp_path, model_dir):
    rng = np.random.default_rng(1)
    items = {}
    for i, (rel, kind) in enumerate([("0_random/a.jpg", 0), ("1_change/b.jpg", 1)]):
        src = (rng.random((512, 512, 3)) * 255).astype(np.uint8)
        _save(tmp_path / "pie" / "annotation_images" / rel, src)
        src = np.asarray(Image.open(tmp_path / "pie" / "annotation_images" / rel))  # as JPEG decoded it
        strip = np.concatenate([src, src], axis=1)  # [source | edited], as editing methods save them
        _save(tmp_path / "edited" / (os.path.splitext(rel)[0] + ".png"), strip)
        items[f"{i:03d}"] = {"image_path": rel, "original_prompt": "a [cat]", "editing_prompt": "a [dog]",
                             "editing_type_id": str(kind), "mask": [512 * 100 + 100, 50]}
    (tmp_path / "pie" / "mapping_file.json").write_text(json.dumps(items))
    rows = datasets.pie_bench_rows(str(tmp_path / "pie"), str(tmp_path / "edited"))
    m = datasets.load_mask(rows[0].mask, (512, 512))
    assert m.sum() == 50 and m[100, 100:150].all()
    argv = ["--layout", "pie-bench", "--data", str(tmp_path / "pie"), "--edited", str(tmp_path / "edited"),
            "--out", str(tmp_path / "out"), "--models", model_dir, "--no-progress", "--pie-bench-compat",
            "--metrics", "mse,psnr"]
    assert scorer.main(argv) == 0
    rows = _read(tmp_path / "out" / "scores.csv")
    assert [r[1] for r in rows[1:]] == ["0", "1"] and all(float(r[2]) == 0 for r in rows[1:])  # right half cropped


def test_dreambench_layout(tmp_path, model_dir):
    rng = np.random.default_rng(2)
    for k in range(2):
        _save(tmp_path / "dataset" / "dog" / f"{k:02d}.jpg", (rng.random((32, 32, 3)) * 255).astype(np.uint8))
    for p in ("a dog in the snow", "a dog on the beach"):
        for k in range(2):
            _save(tmp_path / "gen" / "dog" / p / f"{k}.png", (rng.random((32, 32, 3)) * 255).astype(np.uint8))
    argv = ["--layout", "dreambench", "--data", str(tmp_path / "dataset"), "--generated", str(tmp_path / "gen"),
            "--out", str(tmp_path / "out"), "--models", model_dir, "--no-progress"]
    assert scorer.main(argv) == 0
    rows = _read(tmp_path / "out" / "scores.csv")
    assert rows[0] == ["id", "category", "dino", "clip_i", "clip_t"] and len(rows) == 5
    assert all(-1 <= float(v) <= 1 for r in rows[1:] for v in r[2:])


def test_the_cli_dispatches_score(pairs, tmp_path, model_dir, capsys):
    from editlab.headless import runner
    argv = ["score", *_argv(pairs, tmp_path / "cli", model_dir, "--metrics", "mse,psnr")]
    assert runner.main(argv) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "cli" / "scores.csv"), str(tmp_path / "cli" / "summary.md")]
    assert runner.main(["score", *_argv(pairs, tmp_path / "cli2", model_dir, "--metrics", "fid")]) == 2


def test_l2_to_the_guide_and_kid_in_the_summary(pairs, tmp_path, model_dir, monkeypatch):
    from editlab.metrics import models
    # the real Inception loader is tested in test_metrics_models; here a small stand-in keeps the test fast
    monkeypatch.setattr(models, "load_inception",
                        lambda dirs, name="inception": models.FeatureModel(rmm.TinyFeatures(), "-", "stand-in"))
    assert scorer.main(_argv(pairs, tmp_path / "o", model_dir, "--metrics", "mse,l2", "--kid", "--kid-subset", "4")) == 0
    rows = _read(tmp_path / "o" / "scores.csv")
    assert rows[0] == ["id", "category", "mse", "l2"]
    src = np.asarray(Image.open(tmp_path / "img" / "s0.png"), np.float64) / 255
    out = np.asarray(Image.open(tmp_path / "img" / "e0.png"), np.float64) / 255
    assert float(rows[1][3]) == pytest.approx(np.sqrt(((src - out) ** 2).sum()), rel=1e-5)  # by hand
    summary = (tmp_path / "o" / "summary.md").read_text()
    assert "KID (sources vs edited, stand-in, 7 images):" in summary


def test_dreambench_encodes_each_subjects_references_once_with_the_same_scores(tmp_path, model_dir, monkeypatch):
    """Blocks of 3 rows over 2 subjects x 4 images: every subject's references are embedded once for the whole
    run (not per block or per image), and the scores equal scoring each image against the raw references."""
    import torch
    from editlab.metrics import edit, models
    rng = np.random.default_rng(5)
    for subject in ("dog", "cat"):
        for k in range(3):
            _save(tmp_path / "dataset" / subject / f"{k:02d}.jpg", (rng.random((32, 32, 3)) * 255).astype(np.uint8))
        for p in (f"a {subject} in the snow", f"a {subject} on the beach"):
            for k in range(2):
                _save(tmp_path / "gen" / subject / p / f"{k}.png", (rng.random((32, 32, 3)) * 255).astype(np.uint8))
    calls = []
    real = edit.reference_embeds
    monkeypatch.setattr(edit, "reference_embeds", lambda refs, *a, **k: calls.append(refs.shape[0]) or real(refs, *a, **k))
    argv = ["--layout", "dreambench", "--data", str(tmp_path / "dataset"), "--generated", str(tmp_path / "gen"),
            "--out", str(tmp_path / "out"), "--models", model_dir, "--no-progress", "--batch", "3"]
    assert scorer.main(argv) == 0
    assert calls == [3, 3], "one reference embedding per subject"
    rows = {r[0]: r for r in _read(tmp_path / "out" / "scores.csv")[1:]}
    assert len(rows) == 8
    clip, dino = models.load_clip("clip-vit-large-patch14", [model_dir]), models.load_vit("dino", "dino-vits16", [model_dir])
    for row in datasets.dreambench_rows(str(tmp_path / "dataset"), str(tmp_path / "gen")):
        refs = torch.stack([datasets.load_image(p) for p in row.images["references"]])
        gen = datasets.load_image(row.images["generated"])[None]
        want, = edit.subject_metrics(gen, refs, [row.prompt], clip, dino)
        got = rows[row.id]
        assert [float(v) for v in got[2:]] == pytest.approx([want["dino"], want["clip_i"], want["clip_t"]], abs=1e-5)


def test_a_repeated_prompt_is_encoded_once_with_the_same_embedding(model_dir):
    from editlab.metrics import embed, models
    clip = models.load_clip("clip-vit-large-patch14", [model_dir])
    seen = []
    real = clip.text_features
    clip.text_features = lambda texts: seen.append(list(texts)) or real(texts)
    many = embed.clip_text_embeds(clip, ["a dog", "a cat", "a dog", "a dog"])
    assert seen == [["a dog", "a cat"]]
    one = [embed.clip_text_embeds(clip, [t]) for t in ("a dog", "a cat")]
    import torch
    assert torch.allclose(many, torch.cat([one[0], one[1], one[0], one[0]]), atol=1e-6)
