"""Gradient guidance benchmark (issue 15): cost of a guided step against an unguided one, and peak memory.

Same checkpoint (the random SD1.5-architecture weights), sampler (euler), schedule, seed and size for every
contender: ComfyUI's CFGGuider (unguided), then the Gradient Guider with a CLIP Guidance Loss (a tiny random CLIP
in the Hugging Face layout: the UNet and the VAE are the cost) guiding *every* step, in ``x0`` and ``model`` mode,
with and without gradient checkpointing, and in both modes with TAESD (ComfyUI's tiny autoencoder) as the
loss's decoder. Times: the contenders interleaved in one process (load drift hits all alike). Peak memory:
each contender in its own process (a fresh allocator: the peak of one cannot hide in memory another freed), the rise of the peak resident set during one sampling run over the loaded models (see ``one_peak``).

    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_gradient.py [--size 64] [--steps 3] [--repeats 1]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_medians, machine, setup  # noqa: E402

CONTENDERS = {  # name -> (gradient_through, checkpointing); None = ComfyUI's CFGGuider
    "unguided (CFGGuider)": None,
    "x0": ("x0", True),
    "x0, no checkpointing": ("x0", False),
    "x0, TAESD decoder": ("x0", True),
    "model": ("model", True),
    "model, no checkpointing": ("model", False),
    "model, TAESD decoder": ("model", True),
}
TARGETS = {"x0": 1.5, "model": 3.0}


def random_taesd():
    """TAESD (ComfyUI's tiny autoencoder, what VAELoader builds for 'taesd') with random weights: a cheap decoder
    for the loss. Random weights cost the same as the published ones."""
    import comfy.sd
    import comfy.taesd.taesd
    g = torch.Generator().manual_seed(7)
    sd = {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in comfy.taesd.taesd.TAESD().state_dict().items()}
    sd["vae_scale"], sd["vae_shift"] = torch.tensor(0.18215), torch.tensor(0.0)
    with torch.inference_mode():
        return comfy.sd.VAE(sd=sd)


def load(args) -> dict:
    """ComfyUI, the checkpoint, the conds, the schedule and one guider per contender."""
    env = setup(args.work, diffusers=False)
    import comfy.samplers
    import comfy.sd
    import comfy_extras.nodes_custom_sampler as cs
    import folder_paths
    import nodes
    import random_metric_models as rmm

    clip_dir = Path(args.work) / "editlab_metrics"
    if not (clip_dir / "bench-clip" / "config.json").exists():
        rmm.write_clip(clip_dir / "bench-clip", image_size=32, patch=8)
    folder_paths.add_model_folder_path("editlab_metrics", str(clip_dir), is_default=True)
    mapping = nodes.NODE_CLASS_MAPPINGS
    with torch.inference_mode():
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(
            folder_paths.get_full_path_or_raise("checkpoints", env["checkpoint"]), output_vae=True, output_clip=True)[:3]
        pos = nodes.CLIPTextEncode().encode(clip, "a red apple on a table")[0]
        neg = nodes.CLIPTextEncode().encode(clip, "")[0]
        (latent,) = nodes.EmptyLatentImage().generate(args.size, args.size, 1)
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "karras", args.steps).cpu()
        loss = mapping["EditLabCLIPGuidanceLoss"].execute(
            clip_model="bench-clip", text="a red apple", text_weight=1.0, image_weight=1.0, cutouts=8,
            cut_size_min=0.5, cut_size_max=1.0, augment=0.05, seed=0).result[0]
    taesd = random_taesd()
    guiders = {}
    for name, setting in CONTENDERS.items():
        if setting is None:
            guiders[name] = cs.CFGGuider().get_guider(model, pos, neg, 7.5)[0]
        else:
            guiders[name] = mapping["EditLabGradientGuider"].execute(
                model=model, positive=pos, negative=neg, cfg=7.5, loss=loss, scale=100.0, sigma_start=0.0,
                sigma_end=1.0, every_k=1, gradient_through=setting[0], checkpointing=setting[1], rows="",
                vae=taesd if "TAESD" in name else vae).result[0]

    def runner(guider):
        def run():
            with torch.inference_mode():
                return cs.SamplerCustomAdvanced().sample(cs.Noise_RandomNoise(0), guider,
                                                         comfy.samplers.sampler_object("euler"), sigmas, latent)[0]
        return run
    return {name: runner(g) for name, g in guiders.items()}


def peak_rss_mib() -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 1024


def one_peak(name: str, args) -> dict:
    """Peak resident memory of one sampling run with one contender, over the loaded models, in a fresh process.

    Started with a fixed glibc mmap threshold (``MALLOC_MMAP_THRESHOLD_``), so large tensors are mapped and
    unmapped one by one and the resident set follows the live tensors; the peak (``VmHWM``) is reset after
    loading and one warm-up run (the models a contender loads on first use count as loaded models, as for
    the unguided one), since loading's own peak (state dict + model) would otherwise hide the sampling's.
    """
    import gc
    runs = load(args)
    runs[name]()  # warm-up: what a contender loads on first use (TAESD, the CLIP loss's model) is model memory
    gc.collect()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # VmHWM := VmRSS
    loaded = peak_rss_mib()
    runs[name]()
    return {"name": name, "peak_mib": peak_rss_mib(), "loaded_mib": loaded}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=64, help="image size in px (multiple of 8)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per contender, interleaved")
    ap.add_argument("--work", default=str(Path(__file__).resolve().parent / "out"))
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: peak memory of one contender
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one_peak(args.one, args)), flush=True)
        return
    runs = load(args)
    times = interleaved_medians(runs, args.repeats, warmup=1)
    print(f"# times {times}", file=sys.stderr, flush=True)
    peaks = {}
    for name in CONTENDERS:
        cmd = [sys.executable, __file__, "--one", name, "--size", str(args.size), "--steps", str(args.steps),
               "--work", args.work]
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if out.returncode != 0 or not line:
            raise SystemExit(f"{name} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
        peaks[name] = json.loads(line[0][len("RESULT "):])
        print(f"# {peaks[name]}", file=sys.stderr, flush=True)
    base = next(iter(CONTENDERS))
    print(f"Gradient guidance, {args.size} px, euler {args.steps} steps, cfg 7.5, every step guided, CLIP loss with "
          f"8 cut-outs (tiny random CLIP); times interleaved in one process (median of {args.repeats}), peak "
          f"memory of one run in a separate process per contender; {machine()}\n")
    print("| contender | s / step | x unguided | sampling peak MiB over loaded models | x unguided | "
          "process peak x unguided | target |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name in CONTENDERS:
        mode = name.split(",")[0]
        target = f"time <= {TARGETS[mode]}x" if mode in TARGETS else ""
        if name in ("x0", "model", "x0, TAESD decoder", "model, TAESD decoder"):
            target += ", memory <= 1.5x"
        step = times[name] / args.steps
        p = peaks[name]
        rise = p["peak_mib"] - p["loaded_mib"]
        base_rise = peaks[base]["peak_mib"] - peaks[base]["loaded_mib"]
        print(f"| {name} | {step:.3f} | {times[name] / times[base]:.2f} | {rise:.0f} | {rise / base_rise:.2f} | "
              f"{p['peak_mib'] / peaks[base]['peak_mib']:.2f} | {target} |")


if __name__ == "__main__":
    main()
