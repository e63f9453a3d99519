"""``editlab batch`` benchmark (issue 14): rows per second with 1 and 2 local workers, and the batch
runner's per-row overhead against the same workflow queued directly on one executor.

Same workflow (SDEdit stroke -> image, 64 px, ``--steps``), same rows, random SD1.5-architecture weights.
Rates are steady-state: from the workers' finish times of the rows after each worker's first row (which loads
the checkpoint), so process start and model load are reported apart (``end_to_end``).

    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_batch.py [--rows 8] [--steps 3] [--backend local|ray]
    python bench/bench_batch.py --orchestration 200     # the runner's own cost per row, no ComfyUI
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, setup  # noqa: E402

WORKFLOW = "SDEdit - stroke painting to image"
BIND = ["LoadImage.image=image_path", "Positive prompt.text=prompt"]


def _dataset(folder: Path, rows: int) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = ["id,image_path,prompt"]
    for i in range(rows):
        Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(folder / f"{i}.png")
        lines.append(f"row{i:03d},{i}.png,a photo of a mountain lake {i}")
    (folder / "rows.csv").write_text("\n".join(lines) + "\n")
    return str(folder / "rows.csv")


def _steady_rate(times: list[float], workers: int) -> float:
    """Rows per second after warm-up: the records after the first ``workers`` ones, over their span."""
    times = sorted(times)
    if len(times) <= workers:
        return float("nan")
    return (len(times) - workers) / (times[-1] - times[workers - 1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--backend", choices=("local", "ray"), default="local",
                    help="the batch runner's backend for the batch rows (ray: a local Ray instance per run)")
    ap.add_argument("--work", default=str(Path(__file__).resolve().parent / "out" / "batch"))
    ap.add_argument("--orchestration", type=int, default=0, metavar="ROWS",
                    help="only time the runner's own per-row cost (stand-in worker, no ComfyUI) over ROWS rows")
    args = ap.parse_args()
    work = Path(args.work).resolve()
    if args.orchestration:
        return orchestration(args.orchestration, work)
    env = setup(work, diffusers=False)
    from editlab.headless import batch
    from editlab.headless.convert import convert

    runner = env["runner"]
    with open(Path(__file__).resolve().parents[1] / "workflows" / f"{WORKFLOW}.json", encoding="utf-8") as fh:
        prompt = convert(json.load(fh), runner.definitions())
    for node in prompt.values():
        node["inputs"].update({k: v for k, v in {"steps": args.steps}.items() if k in node["inputs"]})
        if node["class_type"] == "CheckpointLoaderSimple":
            node["inputs"]["ckpt_name"] = env["checkpoint"]
    data = _dataset(work / "data", args.rows)
    common = dict(bind=BIND, seed=0, model_paths=[f"checkpoints={env['checkpoint_path'].parent}"],
                  comfyui=os.environ["COMFYUI_PATH"])

    def batch_run(name: str, workers: int, threads: int | None) -> dict:
        out = work / name
        shutil.rmtree(out, ignore_errors=True)
        plan = batch.make_plan(prompt, data, str(out), threads=threads, **common)
        finished: list[float] = []  # the workers' own finish times: Ray hands records back in bursts
        t0 = time.perf_counter()
        summary = batch.run_batch(plan, backend=args.backend, workers=workers, progress=False,
                                  on_record=lambda r: finished.append(r["finished"]))
        return {"workers": workers, "threads": threads or (os.cpu_count() or 1) // workers,
                "steady_rows_per_s": _steady_rate(finished, workers), "end_to_end_s": time.perf_counter() - t0,
                "failed": summary["failed"]}

    def direct_run(threads: int | None = None) -> dict:
        """The same rows queued one after another on one executor in this process (no batch runner), with
        ``threads`` torch threads (default: as set)."""
        import torch
        before = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            return _direct_run()
        finally:
            torch.set_num_threads(before)

    def _direct_run() -> dict:
        import copy

        import torch
        plan = batch.make_plan(prompt, data, str(work / "direct"), **common)
        executor = runner.new_executor()
        arrivals = []
        t0 = time.perf_counter()
        for row_id, row in plan.source.rows():
            task = batch.make_task(plan, row_id, row)
            p = copy.deepcopy(prompt)
            for node, name, value in task["set"]:
                p[node]["inputs"][name] = value
            runner.run_prompt(p, output_dir=str(work / "direct" / task["row"]), executor=executor)
            arrivals.append(time.perf_counter())
        return {"workers": 0, "threads": torch.get_num_threads(), "steady_rows_per_s": _steady_rate(arrivals, 1),
                "end_to_end_s": time.perf_counter() - t0, "failed": 0}

    results = {}
    for key, fn in (("direct", direct_run), ("direct_1t", lambda: direct_run(1)), ("1w", lambda: batch_run("w1", 1, None)),
                    ("2w_1t", lambda: batch_run("w2", 2, 1)), ("1w_1t", lambda: batch_run("w1t1", 1, 1))):
        results[key] = fn()
        sys.stderr.write(f"{key}: {json.dumps(results[key])}\n")  # as it goes: a cut run still reports
    r = {k: v["steady_rows_per_s"] for k, v in results.items()}
    report = {
        "machine": machine(), "backend": args.backend, "rows": args.rows, "steps": args.steps, "runs": results,
        "scaling_efficiency_same_cores": r["2w_1t"] / (2 * r["1w"]),
        "scaling_efficiency_per_worker_threads": r["2w_1t"] / (2 * r["1w_1t"]),
        "per_row_overhead_batch_vs_direct": r["direct"] / r["1w"],
        "per_row_overhead_batch_vs_direct_1_thread": r["direct_1t"] / r["1w_1t"],
    }
    sys.stdout.write(json.dumps(report, indent=1) + "\n")


def orchestration(rows: int, work: Path) -> None:
    """The batch runner's own cost per row, without ComfyUI: a stand-in worker (tests/pure/test_batch.py)
    that reads the row's image and writes one file, so what is timed is task building, the pipe to the
    worker process and back, the atomic rename and the synced manifest line."""
    import importlib.util
    root = Path(__file__).resolve().parents[1]
    if "editlab" not in sys.modules:
        spec = importlib.util.spec_from_file_location("editlab", root / "__init__.py", submodule_search_locations=[str(root)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["editlab"] = module
        spec.loader.exec_module(module)
    from editlab.headless import batch
    data = work / "orch_data"
    (data / "img").mkdir(parents=True, exist_ok=True)
    lines = ["id,image_path,prompt"] + [f"r{i},img/{i}.png,p{i}" for i in range(rows)]
    for i in range(rows):
        (data / "img" / f"{i}.png").write_bytes(bytes([i % 256]) * 64)
    (data / "rows.csv").write_text("\n".join(lines) + "\n")
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": "x.png"}},
              "2": {"class_type": "CLIPTextEncode", "inputs": {"text": ""}},
              "3": {"class_type": "KSampler", "inputs": {"seed": 0}}}
    out = {}
    for workers in (1, 2):
        target = work / f"orch_{workers}"
        shutil.rmtree(target, ignore_errors=True)
        plan = batch.make_plan(prompt, str(data / "rows.csv"), str(target), bind=["1.image=image_path", "2.text=prompt"],
                               worker=f"{root / 'tests' / 'support' / 'batch_checks.py'}:StandIn")
        arrivals: list[float] = []
        batch.run_batch(plan, workers=workers, progress=False, on_record=lambda r: arrivals.append(time.perf_counter()))
        out[f"{workers}w_ms_per_row"] = 1000 / _steady_rate(arrivals, workers)
    sys.stdout.write(json.dumps({"rows": rows, **out}, indent=1) + "\n")


if __name__ == "__main__":
    main()
