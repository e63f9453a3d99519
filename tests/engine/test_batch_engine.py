"""``editlab batch`` on the real engine: worker processes that each boot ComfyUI once, on the random
SD1.5-architecture checkpoint (found through ``--model-path``), over a small CSV of 64 px images."""
from __future__ import annotations

import os

import numpy as np
import pytest
from batch_checks import KillOther, records, results
from PIL import Image

from editlab.headless import batch

WORKFLOW = "SDEdit - stroke painting to image"
FAST = {"steps": 3, "width": 64, "height": 64}
BIND = ["LoadImage.image=image_path", "Positive prompt.text=prompt"]


@pytest.fixture(scope="module")
def dataset(engine, tmp_path_factory):
    root = tmp_path_factory.mktemp("batch_data")
    rng = np.random.default_rng(3)
    lines = ["id,image_path,prompt"]
    for i in range(4):
        Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(root / f"{i}.png")
        lines.append(f"img{i},{i}.png,a photo of a lake number {i}")
    (root / "bad.png").write_bytes(b"this is not an image")
    lines.insert(3, "bad,bad.png,a broken row")
    (root / "rows.csv").write_text("\n".join(lines) + "\n")
    return str(root / "rows.csv")


def _plan(engine, data, out):
    return batch.make_plan(engine.prompt(WORKFLOW, **FAST), data, str(out), bind=BIND, seed=11, threads=1,
                           model_paths=[f"checkpoints={engine.root / 'models' / 'checkpoints'}"],
                           input_dir=str(engine.root / "input"), comfyui=os.environ["COMFYUI_PATH"])


@pytest.fixture(scope="module")
def one_worker(engine, dataset, tmp_path_factory):
    plan = _plan(engine, dataset, tmp_path_factory.mktemp("one") / "out")
    batch.run_batch(plan, workers=1, progress=False)
    return plan.out


def test_single_worker_run_saves_one_image_per_good_row(one_worker):
    recs = {r["row"]: r for r in records(one_worker)}
    assert sorted(recs) == ["bad", "img0", "img1", "img2", "img3"]
    assert "LoadImage" in recs["bad"]["error"] and recs["bad"]["outputs"] == []  # the bad row fails alone
    for row in ("img0", "img1", "img2", "img3"):
        assert recs[row]["error"] is None and len(recs[row]["outputs"]) == 1
        with Image.open(os.path.join(one_worker, recs[row]["outputs"][0])) as im:
            assert im.size == (64, 64)
    pixels = [np.asarray(Image.open(os.path.join(one_worker, recs[r]["outputs"][0]))) for r in ("img0", "img1")]
    assert not np.array_equal(*pixels), "two rows with other inputs and seeds give other images"


def test_two_workers_with_one_killed_match_one_worker_bit_for_bit(engine, dataset, one_worker, tmp_path):
    plan = _plan(engine, dataset, tmp_path / "out")
    kill_other = KillOther()

    batch.run_batch(plan, workers=2, progress=False, on_record=kill_other)
    assert kill_other.killed, "a worker process was killed mid-run"
    assert sorted(r["row"] for r in records(plan.out)) == ["bad", "img0", "img1", "img2", "img3"]  # each once
    assert results(plan.out) == results(one_worker)


def test_interrupted_run_resumes_to_the_same_manifest_and_files(engine, dataset, one_worker, tmp_path):
    seen = []

    def interrupt(record):
        seen.append(record)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        batch.run_batch(_plan(engine, dataset, tmp_path / "out"), workers=2, progress=False, on_record=interrupt)
    summary = batch.run_batch(_plan(engine, dataset, tmp_path / "out"), workers=2, progress=False)
    assert summary["skipped"] == 2 and summary["ran"] == 3
    assert sorted(r["row"] for r in records(tmp_path / "out")) == ["bad", "img0", "img1", "img2", "img3"]
    assert results(str(tmp_path / "out")) == results(one_worker)


def test_ray_backend_with_a_killed_actor_matches_one_worker(engine, dataset, one_worker, tmp_path):
    ray = pytest.importorskip("ray", reason="ray is not installed: the Ray backend is optional")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             object_store_memory=100 * 2**20)
    try:
        plan = _plan(engine, dataset, tmp_path / "out")
        kill_other = KillOther()
        batch.run_batch(plan, backend="ray", workers=2, progress=False, on_record=kill_other)
    finally:
        ray.shutdown()
    assert sorted(r["row"] for r in records(plan.out)) == ["bad", "img0", "img1", "img2", "img3"]  # each once
    assert results(plan.out) == results(one_worker)
