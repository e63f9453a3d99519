"""DreamBooth Train vs ComfyUI's core Train LoRA (issue: DreamBooth).

Side by side in one process on the same random SD1.5-architecture weights, the same adapter (LoRA, the
same rank), the same rows per step (core: batch 2 of instance images; ours: 1 instance + 1 class row,
prior preservation on), fp32, the same gradient-checkpointing setting: per-step time (median over
interleaved runs) and peak memory. Also the loss curves of the ``model`` (eps-MSE) and ``x0`` targets.

    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_dreambooth.py [--size 64] [--steps 6] [--repeats 3]

Peak memory needs one process per side (in one process, memory the first side freed stays resident and
hides the second side's peak): ``--memory`` starts a fresh process per side and repeat (``--side``), each
loading the model, running one warm-up step, then measuring the training run's peak over its starting RSS.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_medians, machine, run_with_peak, setup  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--curve-steps", type=int, default=40)
    ap.add_argument("--work", default=str(Path(__file__).resolve().parent / "out"))
    ap.add_argument("--memory", action="store_true", help="peak memory only, one fresh process per side and repeat")
    ap.add_argument("--side", choices=("core", "ours"), help=argparse.SUPPRESS)  # a --memory child
    args = ap.parse_args()
    if args.memory:
        return memory(args)
    env = setup(args.work, diffusers=False)
    import nodes

    with torch.inference_mode():
        model, clip, _vae = nodes.CheckpointLoaderSimple().load_checkpoint(env["checkpoint"])[:3]
        inst_cond = nodes.CLIPTextEncode().encode(clip, "a vzk dog")[0]
        cls_cond = nodes.CLIPTextEncode().encode(clip, "a dog")[0]
    side = args.size // 8
    g = torch.Generator().manual_seed(0)
    instance = {"samples": torch.randn((4, 4, side, side), generator=g)}
    classes = {"samples": torch.randn((8, 4, side, side), generator=g)}
    core = nodes.NODE_CLASS_MAPPINGS["TrainLoraNode"]()
    ours = nodes.NODE_CLASS_MAPPINGS["EditLabDreamBoothTrain"]

    def run_core(steps=args.steps):
        with torch.inference_mode():
            return core.train(model, instance, inst_cond, 2, steps, 1, 1e-4, args.rank, "AdamW", "MSE", 0, "fp32",
                              "fp32", "LoRA", args.checkpointing, "[None]")

    def run_ours(steps=args.steps, target="model"):
        with torch.inference_mode():
            return ours.execute(model=model, instance_latents=instance, instance_conditioning=inst_cond,
                                class_latents=classes, class_conditioning=cls_cond, prior_loss_weight=1.0,
                                steps=steps, learning_rate=1e-4, rank=args.rank, algorithm="LoRA", loss_target=target,
                                batch_size=1, seed=0, gradient_checkpointing=args.checkpointing, save_every=0,
                                checkpoint_name="bench", resume=False).result

    if args.side:  # a --memory child: warm up (first-call allocations), then the measured run
        run = run_core if args.side == "core" else run_ours
        run(1)
        _, peak = run_with_peak(run)
        print(json.dumps({"side": args.side, "peak_mib": peak}))
        return
    times = interleaved_medians({"core": run_core, "ours": run_ours}, repeats=args.repeats)
    _, peak_core = run_with_peak(run_core)
    _, peak_ours = run_with_peak(run_ours)
    curves = {t: run_ours(args.curve_steps, t)[2] for t in ("model", "x0")}
    per_step = {k: v / args.steps for k, v in times.items()}
    print(json.dumps({
        "machine": machine(), "size_px": args.size, "rows_per_step": 2, "rank": args.rank,
        "gradient_checkpointing": args.checkpointing, "steps": args.steps,
        "s_per_step": per_step, "time_ratio_ours_over_core": per_step["ours"] / per_step["core"],
        "peak_mib": {"core": peak_core, "ours": peak_ours},
        "memory_ratio_ours_over_core": peak_ours / peak_core if peak_core > 0 else None,
        "loss_curves": {t: {"first5": c["instance"][:5], "last5": c["instance"][-5:]} for t, c in curves.items()},
    }, indent=1))


def memory(args: argparse.Namespace) -> None:
    """Peak memory per side, each in fresh processes (alternating), medians and the ratio."""
    peaks: dict[str, list[float]] = {"core": [], "ours": []}
    flags = ["--size", str(args.size), "--steps", str(args.steps), "--rank", str(args.rank), "--work", args.work]
    flags += ["--checkpointing"] if args.checkpointing else []
    for _ in range(args.repeats):
        for side in ("core", "ours"):
            # a fixed glibc mmap threshold: tensors above 64 KiB are mapped and unmapped on free, so the resident
            # set follows the live tensors instead of the allocator's retained heap (as bench_gradient.py)
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
            out = subprocess.run([sys.executable, __file__, "--side", side, *flags], check=True, capture_output=True,
                                 text=True, env=env).stdout
            peaks[side].append(json.loads(out.strip().splitlines()[-1])["peak_mib"])
    med = {k: statistics.median(v) for k, v in peaks.items()}
    print(json.dumps({"machine": machine(), "size_px": args.size, "steps": args.steps, "rank": args.rank,
                      "gradient_checkpointing": args.checkpointing, "peak_mib_runs": peaks, "peak_mib_median": med,
                      "memory_ratio_ours_over_core": med["ours"] / med["core"] if med["core"] > 0 else None}, indent=1))


if __name__ == "__main__":
    main()
