"""``editlab batch``: data specs, bindings, per-row seeds, manifest and resume, local and Ray orchestration,
driven by a stand-in worker (no ComfyUI) that the worker processes load from this file."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import batch_checks
from batch_checks import KillOther, records, results

from editlab.errors import EditLabError
from editlab.headless import batch

STANDIN = f"{os.path.abspath(batch_checks.__file__)}:StandIn"  # loaded by the worker processes
PROMPT = {
    "1": {"class_type": "LoadImage", "inputs": {"image": "x.png"}, "_meta": {"title": "Load Image"}},
    "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}, "_meta": {"title": "Source prompt"}},
    "3": {"class_type": "KSampler", "inputs": {"seed": 5, "steps": 3, "model": ["4", 0]}, "_meta": {"title": "KSampler"}},
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "a.safetensors"}, "_meta": {"title": "ckpt"}},
}
BIND = ["Load Image.image=image_path", "Source prompt.text=prompt"]


def _dataset(tmp_path, prompts):
    data = tmp_path / "data"
    (data / "img").mkdir(parents=True)
    lines = ["id,image_path,prompt"]
    for i, p in enumerate(prompts):
        (data / "img" / f"{i}.png").write_bytes(bytes([i]) * 16)
        lines.append(f"r{i},img/{i}.png,{p}")
    (data / "rows.csv").write_text("\n".join(lines) + "\n")
    return str(data / "rows.csv")


def _plan(tmp_path, data, out="out", bind=BIND, **kw):
    return batch.make_plan(PROMPT, data, str(tmp_path / out), bind=bind, worker=STANDIN, **kw)






def test_local_two_workers_run_each_row_once_and_match_one_worker(tmp_path):
    data = _dataset(tmp_path, [f"a photo {i}" for i in range(8)])
    two = _plan(tmp_path, data, "two")
    two.worker_config["sleep"] = 0.2
    summary = batch.run_batch(two, workers=2, progress=False)
    one = _plan(tmp_path, data, "one")
    batch.run_batch(one, workers=1, progress=False)
    recs = records(two.out)
    assert sorted(r["row"] for r in recs) == [f"r{i}" for i in range(8)]  # each row exactly once
    assert len({r["worker"] for r in recs}) == 2, "both workers took rows"
    assert summary["done"] == 8 and summary["failed"] == 0
    assert results(two.out) == results(one.out)
    seeds = {r["inputs"]["3.seed"] for r in recs}
    assert len(seeds) == 8 and 5 not in seeds  # a derived seed per row replaces the workflow's
    assert not [n for n in os.listdir(os.path.join(two.out, "rows")) if n.startswith(".tmp")]


def test_failing_row_fails_alone_and_dead_workers_are_replaced(tmp_path):
    data = _dataset(tmp_path, ["ok 0", "boom", "die-once", "die", "ok 4"])
    plan = _plan(tmp_path, data)
    summary = batch.run_batch(plan, workers=2, progress=False)
    recs = {r["row"]: r for r in records(plan.out)}
    assert sorted(recs) == ["r0", "r1", "r2", "r3", "r4"] and len(records(plan.out)) == 5
    assert recs["r1"]["error"] == "ValueError: boom row" and recs["r1"]["outputs"] == []
    assert recs["r2"]["error"] is None and recs["r2"]["outputs"] == ["rows/r2/out.bin"]  # retried on a new process
    assert "worker process died" in recs["r3"]["error"]
    assert recs["r0"]["error"] is None and recs["r4"]["error"] is None
    assert summary["failed"] == 2 and summary["done"] == 3


def test_interrupted_run_resumes_to_the_same_manifest_and_files(tmp_path):
    data = _dataset(tmp_path, [f"p{i}" for i in range(7)])
    whole = _plan(tmp_path, data, "whole")
    batch.run_batch(whole, workers=2, progress=False)

    part = _plan(tmp_path, data, "part")
    seen = []

    def interrupt(record):
        seen.append(record)
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        batch.run_batch(part, workers=2, progress=False, on_record=interrupt)
    assert len(records(part.out)) == 3
    with open(os.path.join(part.out, "manifest.jsonl"), "a") as fh:
        fh.write('{"row": "r6", "inputs": {"torn')  # a write cut by a kill
    summary = batch.run_batch(_plan(tmp_path, data, "part"), workers=2, progress=False)
    assert summary["skipped"] == 3 and summary["done"] == 4
    assert sorted(r["row"] for r in records(part.out)) == [f"r{i}" for i in range(7)]
    assert results(part.out) == results(whole.out)


def test_resume_refuses_another_command(tmp_path):
    data = _dataset(tmp_path, ["a", "b"])
    batch.run_batch(_plan(tmp_path, data), workers=1, progress=False)
    with pytest.raises(EditLabError, match="differs in: seed"):
        batch.run_batch(_plan(tmp_path, data, seed=1), workers=1, progress=False)


def test_seeds_depend_on_run_seed_and_row_only():
    a = batch.derive_seed(0, "r1", "3.seed", 2**32 - 1)
    assert a == batch.derive_seed(0, "r1", "3.seed", 2**32 - 1)
    assert len({a, batch.derive_seed(1, "r1", "3.seed", 2**32 - 1), batch.derive_seed(0, "r2", "3.seed", 2**32 - 1)}) == 3
    assert 0 <= batch.derive_seed(7, "x", "k", 9) <= 9


def test_bound_seed_is_not_replaced(tmp_path):
    data = tmp_path / "rows.jsonl"
    (tmp_path / "x.png").write_bytes(b"x")
    data.write_text(json.dumps({"image_path": "x.png", "s": "42"}) + "\n\n" + json.dumps({"image_path": "x.png", "s": 7}) + "\n")
    plan = _plan(tmp_path, str(data), bind=["1.image=image_path", "KSampler.seed=s"])
    assert plan.seeds == [] and plan.total == 2
    tasks = [batch.make_task(plan, rid, row) for rid, row in plan.source.rows()]
    assert [t["row"] for t in tasks] == ["1", "3"]  # JSONL row ids: line numbers
    assert [t["inputs"]["KSampler.seed"] for t in tasks] == [42, 7]  # text "42" as the INT it replaces
    assert tasks[0]["inputs"]["1.image"] == str(tmp_path / "x.png")


@pytest.mark.parametrize("bind, message", [
    (["Nope.image=image_path"], "node 'Nope' matches 0 nodes"),
    (["Load Image.nope=image_path"], "has no input 'nope'"),
    (["Load Image.image=missing_column"], "has no column 'missing_column'"),
    (["Load Image.image=image_path", "Source prompt.text"], "NODE.INPUT=COLUMN"),
])
def test_bad_specs_fail_before_any_work(tmp_path, bind, message):
    data = _dataset(tmp_path, ["a"])
    with pytest.raises(EditLabError, match=message):
        _plan(tmp_path, data, bind=bind)
    assert not (tmp_path / "out").exists()


def test_paths_outside_the_roots_are_refused(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (tmp_path / "secret.png").write_bytes(b"s")
    (data / "rows.csv").write_text("image_path,prompt\n../secret.png,a\n")
    with pytest.raises(EditLabError, match="outside the dataset root"):
        _plan(tmp_path, str(data / "rows.csv"))
    # ComfyUI's input folder is the other allowed root.
    plan = _plan(tmp_path, str(data / "rows.csv"), input_dir=str(tmp_path))
    assert plan.total == 1


def test_folder_pie_bench_and_dreambench_layouts(tmp_path):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for name in ("b.png", "a.jpg", "sub/c.png", "notes.txt"):
        (folder / name).write_bytes(b"x")
    rows = list(batch.open_source(str(folder)).rows())
    assert [r for r, _ in rows] == ["a", "b", "sub__c"] and rows[0][1]["image_path"] == str(folder / "a.jpg")

    pie = tmp_path / "pie"
    (pie / "annotation_images" / "0_random_140").mkdir(parents=True)
    (pie / "mapping_file.json").write_text(json.dumps({"000000000001": {
        "image_path": "0_random_140/000000000001.jpg", "original_prompt": "a [cat] sitting",
        "editing_prompt": "a [dog] sitting", "editing_type_id": "0", "mask": [1, 2]}}))
    src = batch.open_source(f"pie-bench:{pie}")
    (rid, row), = list(src.rows())
    assert rid == "000000000001" and row["original_prompt"] == "a cat sitting"
    assert row["editing_prompt_marked"] == "a [dog] sitting" and "mask" not in row
    assert row["image_path"] == str(pie / "annotation_images" / "0_random_140" / "000000000001.jpg")

    db = tmp_path / "dreambooth" / "dataset"
    for subject in ("backpack", "dog"):
        (db / subject).mkdir(parents=True)
        (db / subject / "00.jpg").write_bytes(b"x")
    (db / "prompts_and_classes.txt").write_text(
        "Classes\nsubject_name,class\nbackpack,backpack\ndog,dog\n\nPrompts\nObject Prompts\nprompt_list = [\n"
        "'a {0} {1} in the jungle'.format(unique_token, class_token),\n'a {0} {1} in the snow'.format(unique_token, class_token),\n]\n"
        "Live Subject Prompts\nprompt_list = [\n'a {0} {1} in the jungle'.format(unique_token, class_token),\n]\n")
    rows = list(batch.open_source(f"dreambench:{tmp_path / 'dreambooth'}").rows())
    assert [r for r, _ in rows] == ["backpack-00", "backpack-01", "dog-00"]
    assert rows[1][1]["prompt"] == "a backpack in the snow" and rows[2][1]["prompt_token"] == "a sks dog in the jungle"


def test_cli_runs_with_a_stand_in_and_score_says_what_is_missing(tmp_path, capsys):
    data = _dataset(tmp_path, ["a", "b", "boom"])
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(PROMPT))
    argv = [str(wf), "--data", data, "--out", str(tmp_path / "o"), "--worker", STANDIN, "--quiet", "--workers", "2"]
    for b in BIND:
        argv += ["--bind", b]
    assert batch.main(argv) == 1  # a row failed: non-zero, after the run
    out = capsys.readouterr().out
    assert "3 rows, ran 3 (2 done, 1 failed)" in out
    from editlab.headless import runner
    assert runner.main(["batch", *argv]) == 1  # `editlab batch` reaches the same command
    assert "skipped 3 already done" in capsys.readouterr().out
    bad = batch.main([str(wf), "--data", data, "--out", str(tmp_path / "p"), "--worker", STANDIN, "--bind", "X.y=z"])
    assert bad == 2 and "node 'X' matches 0 nodes" in capsys.readouterr().err


def test_score_hands_the_finished_rows_to_the_scorer(tmp_path, monkeypatch):
    scorer = pytest.importorskip("editlab.metrics.scorer", reason="metrics/scorer.py is not in this pack yet")
    data = _dataset(tmp_path, ["a", "boom", "c"])
    plan = _plan(tmp_path, data)
    batch.run_batch(plan, workers=1, progress=False)
    seen = []
    monkeypatch.setattr(scorer, "run", lambda args: seen.append(args) or ("scores.csv", "summary.md"))
    # The stand-in's outputs are out.bin, no image: nothing to score yet.
    batch.score(plan, "Source prompt.text", ["--metrics", "psnr"])
    args, = seen
    assert (args.layout, args.data, args.metrics) == ("pairs", str(tmp_path / "out" / "score_pairs.csv"), "psnr")
    with open(args.data) as fh:
        assert fh.read().splitlines() == ["id,source,edited,prompt"]
    with open(os.path.join(plan.out, "manifest.jsonl"), "a") as fh:  # a record with an image output
        fh.write(json.dumps({"row": "r0", "inputs": {"Load Image.image": "/d/0.png", "Source prompt.text": "a"},
                             "outputs": ["rows/r0/x.png"], "error": None}) + "\n")
    batch.score(plan, "Source prompt.text")
    with open(seen[-1].data) as fh:
        assert fh.read().splitlines()[1] == f"r0,/d/0.png,{plan.out}/rows/r0/x.png,a"
    with pytest.raises(EditLabError, match="not one of the --bind targets"):
        batch.score(plan, "KSampler.seed")


def test_import_loads_neither_comfy_nor_ray_nor_torch():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('editlab', {os.path.join(root, '__init__.py')!r}, "
            f"submodule_search_locations=[{root!r}])\n"
            "m = importlib.util.module_from_spec(spec); sys.modules['editlab'] = m; spec.loader.exec_module(m)\n"
            "import editlab.headless.batch, editlab.headless.batch_worker\n"
            "print(sorted(k for k in ('ray', 'torch', 'comfy', 'nodes') if k in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---------------------------------------------------------------------------------------------- Ray
@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray", reason="ray is not installed: the Ray backend is optional")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             object_store_memory=100 * 2**20)
    yield ray
    ray.shutdown()


def test_ray_backend_runs_each_row_once_matches_local_and_survives_a_killed_actor(tmp_path, ray_local):
    data = _dataset(tmp_path, [f"q{i}" for i in range(6)] + ["boom", "die"])
    local = _plan(tmp_path, data, "local")
    batch.run_batch(local, workers=1, progress=False)
    plan = _plan(tmp_path, data, "ray")
    plan.worker_config["sleep"] = 0.5
    kill_other = KillOther()  # once both actors reported, kill the one that did not just report: it is busy
    summary = batch.run_batch(plan, backend="ray", workers=2, progress=False, on_record=kill_other)
    recs = records(plan.out)
    assert sorted(r["row"] for r in recs) == sorted(f"r{i}" for i in range(8))  # each row once
    assert summary["failed"] == 2 and "worker process died" in {r["row"]: r for r in recs}["r7"]["error"]
    assert {k: v for k, v in results(plan.out).items() if k != "r7"} == \
        {k: v for k, v in results(local.out).items() if k != "r7"}
    assert kill_other.killed, "an actor was killed mid-run"



def test_ray_task_descriptors_stream_to_disk_in_shards(tmp_path):
    """The Ray backend never holds the dataset's rows: the descriptors go to JSONL shards as the plan yields
    them (earlier shards are complete on disk while later rows are still to come), one Ray read task each."""
    from editlab.headless import batch_ray
    folder = tmp_path / "tasks"

    def tasks():
        for i in range(1000):
            if i == 200:  # three shards of 64 are written and closed before row 200 is even produced
                done = sorted(os.listdir(folder))[:3]
                assert done == ["part-00000.jsonl", "part-00001.jsonl", "part-00002.jsonl"]
                assert all(len((folder / n).read_text().splitlines()) == 64 for n in done)
            yield {"row": f"r{i}", "set": [["2", "text", "x" * (i % 7)]]}

    assert batch_ray.write_task_shards(tasks(), str(folder), 64) == 1000
    names = sorted(os.listdir(folder))
    assert len(names) == 16
    lines = [json.loads(json.loads(line)["task"]) for n in names for line in (folder / n).read_text().splitlines()]
    assert [t["row"] for t in lines] == [f"r{i}" for i in range(1000)] and lines[5]["set"][0][2] == "xxxxx"
    assert batch_ray.write_task_shards(iter([]), str(folder), 64) == 0 and not os.listdir(folder)  # rewritten


def test_ray_backend_interrupted_run_resumes_to_the_sameresults(tmp_path, ray_local):
    data = _dataset(tmp_path, [f"s{i}" for i in range(6)])
    whole = _plan(tmp_path, data, "whole")
    batch.run_batch(whole, workers=1, progress=False)
    part = _plan(tmp_path, data, "part")
    part.worker_config["sleep"] = 0.3
    seen = []

    def interrupt(record):
        seen.append(record)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        batch.run_batch(part, backend="ray", workers=2, progress=False, on_record=interrupt)
    summary = batch.run_batch(_plan(tmp_path, data, "part"), backend="ray", workers=2, progress=False)
    assert summary["skipped"] == 2 and summary["done"] == 4
    assert sorted(r["row"] for r in records(part.out)) == [f"r{i}" for i in range(6)]  # each row once
    assert results(part.out) == results(whole.out)


def test_pie_bench_rle_masks_bind_as_decoded_pictures(tmp_path):
    """--bind NODE.image=mask_path on the pie-bench layout: the RLE mask becomes a 512x512 picture under OUT
    (white = edited), once, with the run's other guarantees (confined, same file on a re-run)."""
    import numpy as np
    from PIL import Image
    pie = tmp_path / "pie"
    (pie / "annotation_images" / "0_random_140").mkdir(parents=True)
    (pie / "annotation_images" / "0_random_140" / "1.jpg").write_bytes(b"x")
    rle = [512 * 10 + 20, 30, 512 * 11 + 20, 30, 512 * 511 + 500, 100]  # two 30-px runs, then one clipped at the end
    (pie / "mapping_file.json").write_text(json.dumps({
        "1": {"image_path": "0_random_140/1.jpg", "original_prompt": "a [cat]", "editing_prompt": "a [dog]", "mask": rle},
        "2": {"image_path": "0_random_140/1.jpg", "original_prompt": "a", "editing_prompt": "b", "mask": [3]}}))
    prompt = dict(PROMPT, **{"5": {"class_type": "LoadImageMask", "inputs": {"image": "m.png", "channel": "red"},
                                   "_meta": {"title": "Edit mask"}}})
    plan = batch.make_plan(prompt, f"pie-bench:{pie}", str(tmp_path / "out"), worker=STANDIN,
                           bind=["Load Image.image=image_path", "Edit mask.image=mask_path"])
    rows = dict(plan.source.rows())
    task = batch.make_task(plan, "1", rows["1"])
    path = task["inputs"]["Edit mask.image"]
    assert "error" not in task and path == os.path.join(plan.out, "_masks", "1.png")
    m = np.asarray(Image.open(path)) > 127
    expected = np.zeros(512 * 512, bool)
    expected[512 * 10 + 20:512 * 10 + 50] = expected[512 * 11 + 20:512 * 11 + 50] = True
    expected[512 * 511 + 500:] = True
    assert m.shape == (512, 512) and (m.reshape(-1) == expected).all()
    mtime = os.stat(path).st_mtime_ns
    assert batch.make_task(plan, "1", rows["1"])["inputs"]["Edit mask.image"] == path
    assert os.stat(path).st_mtime_ns == mtime  # made once
    bad = batch.make_task(plan, "2", rows["2"])  # an odd-length RLE fails that row alone, with a message
    assert "mask" in bad["error"] and "RLE" in bad["error"]
