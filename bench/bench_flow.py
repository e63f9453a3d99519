"""FlowEdit and RF-Inversion step cost vs plain sampling (issue 16), on the tiny random SD3- and
Flux-dev-architecture models of ``tests/support/flow_models.py``, same model, latent, steps and guidance.

- FlowEdit: FlowEdit Guider + FlowEdit Sampler (n_max = steps, every step edits) vs CFGGuider + euler on
  the target; per step it makes two guided predictions (source and target), so the target is <= 2.05x.
- RF-Inversion edit: RF-Inversion Guider (eta on every step) + euler vs CFGGuider + euler from the same
  latent; the controller is one blend per step, target <= 1.05x.
- RF-Inversion invert: the controlled forward ODE per step, for reference (one prediction per step).

On a shared CPU the wall-clock ratio is noisy (other processes steal cores mid-run), so every run also
records the model's own time and pass count (a unet wrapper on a clone): ``model-normalised`` ratios price
every contender's passes at the plain run's median time per pass and add the contender's own time
outside the model, which is what the method itself adds.

    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_flow.py [--size 32] [--steps 8] [--repeats 3] [--md FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import import_pack, machine  # noqa: E402

TARGETS = {"flowedit": 2.05, "rf_edit": 1.05}


def bench_kind(kind: str, args) -> dict:
    import comfy.samplers
    import comfy_extras.nodes_custom_sampler as cs
    import flow_models as fm
    import node_helpers
    import nodes

    node = nodes.NODE_CLASS_MAPPINGS
    if kind == "sd3":
        model, src, tar, neg = fm.tiny_sd3_model(0), fm.sd3_conditioning(1), fm.sd3_conditioning(2), fm.sd3_conditioning(3)
        s_src, s_tar, cfg = 3.5, 13.5, 13.5
    else:
        model, src, tar, neg = (fm.tiny_flux_model(0), fm.flux_conditioning(1), fm.flux_conditioning(2),
                                fm.flux_conditioning(3))
        s_src, s_tar, cfg = 1.5, 5.5, 1.0
        tar = node_helpers.conditioning_set_values(tar, {"guidance": s_tar})
    latent = fm.flow_latent(3, size=args.size // 8)
    stats = {"n": 0, "t": 0.0}
    model = model.clone()  # counts passes and model time of every contender alike

    def wrapper(apply_model, a):
        t = time.perf_counter()
        out = apply_model(a["input"], a["timestep"], **a["c"])
        stats["t"] += time.perf_counter() - t
        stats["n"] += 1
        return out

    model.set_model_unet_function_wrapper(wrapper)
    euler = comfy.samplers.sampler_object("euler")
    with torch.inference_mode():
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", args.steps).cpu()
        fe_guider = node[("EditLabFlowEditGuider")].execute(model=model, source=src, target=tar, source_scale=s_src,
                                                           target_scale=s_tar, negative=neg).result[0]
        fe_sampler = node["EditLabFlowEditSampler"].execute(n_max=args.steps, n_min=0, n_avg=1, seed=1).result[0]
        inv, inv_noise, inv_sigmas = node["EditLabRFInversionInvert"].execute(
            model=model, positive=src, latent=latent, steps=args.steps, scheduler="simple", gamma=0.5, seed=2).result
        rf_guider = node["EditLabRFInversionGuider"].execute(model=model, inversion=inv, positive=tar, cfg=cfg, eta=0.9,
                                                            start_step=0, stop_step=args.steps, negative=neg).result[0]
    plain = cs.CFGGuider().get_guider(model, tar, neg, cfg)[0]

    def run(guider, sampler, sig, lat):
        def go():
            with torch.inference_mode():
                return cs.SamplerCustomAdvanced().sample(cs.Noise_EmptyNoise(), guider, sampler, sig, lat)[0]
        return go

    def invert():
        with torch.inference_mode():
            node["EditLabRFInversionInvert"].execute(model=model, positive=src, latent=latent, steps=args.steps,
                                                     scheduler="simple", gamma=0.5, seed=2)

    contenders = {
        "plain": run(plain, euler, sigmas, latent),
        "flowedit": run(fe_guider, fe_sampler, sigmas, latent),
        "plain_from_inversion": run(plain, euler, inv_sigmas, inv_noise),
        "rf_edit": run(rf_guider, euler, inv_sigmas, inv_noise),
        "rf_invert": invert,
    }
    runs = {k: [] for k in contenders}
    for rep in range(args.repeats + 1):  # the first round warms up
        for key, fn in contenders.items():
            stats.update(n=0, t=0.0)
            t = time.perf_counter()
            fn()
            if rep:
                runs[key].append((time.perf_counter() - t, stats["t"], stats["n"]))
    med = {k: {"wall": statistics.median(r[0] for r in v), "model": statistics.median(r[1] for r in v),
               "outside": statistics.median(r[0] - r[1] for r in v), "passes": v[0][2]} for k, v in runs.items()}
    per_pass = med["plain"]["model"] / med["plain"]["passes"]

    def normalised(key: str, base: str) -> float:
        cost = {k: med[k]["passes"] * per_pass + med[k]["outside"] for k in (key, base)}
        return cost[key] / cost[base]

    step = {k: v["wall"] / args.steps for k, v in med.items()}
    return {"step_s": step, "model_passes_per_step": {k: v["passes"] / args.steps for k, v in med.items()},
            "outside_model_ms_per_step": {k: 1e3 * v["outside"] / args.steps for k, v in med.items()},
            "ratio": {"flowedit": step["flowedit"] / step["plain"],
                      "rf_edit": step["rf_edit"] / step["plain_from_inversion"],
                      "rf_invert": step["rf_invert"] / step["plain_from_inversion"]},
            "ratio_model_normalised": {"flowedit": normalised("flowedit", "plain"),
                                       "rf_edit": normalised("rf_edit", "plain_from_inversion"),
                                       "rf_invert": normalised("rf_invert", "plain_from_inversion")}}


def markdown(report: dict) -> str:
    lines = ["# FlowEdit / RF-Inversion step cost (bench/bench_flow.py)", "",
             f"Machine: {report['machine']}. Tiny random models (tests/support/flow_models.py), latent "
             f"{report['size'] // 8}x{report['size'] // 8} (16 ch), {report['steps']} steps, median of "
             f"{report['repeats']} interleaved runs. SD3: CFG 3.5 / 13.5 with a negative; Flux-dev: guidance "
             "embedding 1.5 / 5.5, no CFG pass.", "",
             "| model | contender | step (ms) | model passes / step | outside the model (ms / step) | ratio, wall "
             "| ratio, model-normalised | target |",
             "|---|---|---|---|---|---|---|---|"]
    for kind, r in report["models"].items():
        for key, base, label in (("plain", None, "plain (CFGGuider + euler)"), ("flowedit", "plain", "FlowEdit"),
                                 ("rf_edit", "plain_from_inversion", "RF-Inversion edit (eta every step)"),
                                 ("rf_invert", "plain_from_inversion", "RF-Inversion invert")):
            wall = f"{r['ratio'][key]:.3f}" if base else "1"
            norm = f"{r['ratio_model_normalised'][key]:.3f}" if base else "1"
            target = f"<= {TARGETS[key]}" if key in TARGETS else ""
            lines.append(f"| {kind} | {label} | {1e3 * r['step_s'][key]:.1f} | {r['model_passes_per_step'][key]:g} "
                         f"| {r['outside_model_ms_per_step'][key]:.2f} | {wall} | {norm} | {target} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256, help="image size in px (latent = size / 8; at most 256 for SD3)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--md", default="", help="also write the Markdown table to this file")
    args = ap.parse_args()
    comfy_path = os.environ.get("COMFYUI_PATH")
    if not comfy_path:
        raise SystemExit("set COMFYUI_PATH to a ComfyUI checkout to run the benchmarks")
    import_pack()
    from editlab.headless import runner
    runner.boot(comfy_path)
    report = {"machine": machine(), "size": args.size, "steps": args.steps, "repeats": args.repeats,
              "models": {kind: bench_kind(kind, args) for kind in ("sd3", "flux-dev")}}
    report["targets"] = TARGETS
    print(json.dumps(report, indent=1))
    if args.md:
        Path(args.md).write_text(markdown(report), encoding="utf-8")
        print(markdown(report))


if __name__ == "__main__":
    main()
