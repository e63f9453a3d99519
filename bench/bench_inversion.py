"""Inversion suite benchmarks (issue: inversion suite).

1. Quality: latent-space reconstruction PSNR of DDIM inversion replayed with CFG 7.5 (drift baseline),
   null-text, negative-prompt and direct inversion, plus the guidance-1 replay, on the random
   SD1.5-architecture checkpoint with a ddim_uniform schedule.
2. Null-text speed: EditLab's Null-Text Optimize vs the authors' algorithm re-run side by side (our
   re-implementation of Mokady et al.'s loop on a diffusers UNet with the same weights, written from the
   paper/notebook: cond forward, Adam inner loop with the loss test after each step, then a batched
   [uncond, cond] forward for the step; UNet parameters left trainable as in the notebook). Wall time,
   UNet forwards/backwards, and the reconstruction each reaches. ``--fast-inner N --fast-lr LR`` also runs
   both sides with N inner steps at LR (``--fast-secant``: EditLab's side with its secant correction), on the
   same pivot, so the gain from the settings and the gain from the implementation are reported apart.
3. Direct-inversion edit vs plain DDIM-inversion edit: sampling time of a [source, target] batch.
4. Peak memory (process max RSS, or torch.cuda.max_memory_allocated on a GPU; separate subprocesses) of
   null-text optimisation vs plain sampling. On a GPU both sides run there (the reference in fp32).

    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_inversion.py [--size 64] [--steps 50] [--inner 10]
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_medians, machine, setup  # noqa: E402

PROMPT, EDIT = "a photo of a lake with a boat", "a photo of a lake with a swan"


def load(env):
    import nodes
    with torch.inference_mode():
        return nodes.CheckpointLoaderSimple().load_checkpoint(env["checkpoint"])[:3]


def image(size: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.random((size, size, 3)).astype(np.float32))[None]


def fast_label(args) -> str:
    return f"null-text, {args.fast_inner} inner at lr {args.fast_lr:g}" + (", secant" if args.fast_secant else "")


def ours(env, args):
    import comfy.samplers
    import comfy_extras.nodes_custom_sampler as cs
    import nodes
    from editlab.samplers.inversion import psnr
    N = nodes.NODE_CLASS_MAPPINGS
    model, clip, vae = load(env)
    with torch.inference_mode():
        src = nodes.CLIPTextEncode().encode(clip, PROMPT)[0]
        edit = nodes.CLIPTextEncode().encode(clip, EDIT)[0]
        empty = nodes.CLIPTextEncode().encode(clip, "")[0]
        if args.null_jitter:  # sensitivity probe: a tiny seeded change of the starting null embedding
            g = torch.Generator().manual_seed(args.jitter_seed)
            e = empty[0][0]
            empty = [[e + args.null_jitter * e.std() * torch.randn(e.shape, generator=g), empty[0][1]]]
        (latent,) = nodes.VAEEncode().encode(vae, image(args.size, args.image_seed))
        t = time.perf_counter()
        inv, noise, sigmas = N["EditLabDDIMInvert"].execute(model=model, positive=src, latent=latent, steps=args.steps,
                                                            scheduler="ddim_uniform", guidance=1.0,
                                                            input_scaling="reference").result
        t_invert = time.perf_counter() - t
        t = time.perf_counter()
        (tuned,) = N["EditLabNullTextOptimize"].execute(model=model, inversion=inv, negative=empty, guidance=7.5,
                                                        inner_steps=args.inner, early_stop=1e-5,
                                                        early_stop_slope=2e-5, learning_rate=1e-2,
                                                        check_model=True).result
        t_null = time.perf_counter() - t
        fast, t_fast = None, None
        if args.fast_inner:  # fewer inner iterations (at --fast-lr; with the secant correction if asked)
            t = time.perf_counter()
            (fast,) = N["EditLabNullTextOptimize"].execute(model=model, inversion=inv, negative=empty, guidance=7.5,
                                                           inner_steps=args.fast_inner, early_stop=1e-5,
                                                           early_stop_slope=2e-5, learning_rate=args.fast_lr,
                                                           check_model=True, secant=args.fast_secant).result
            t_fast = time.perf_counter() - t
    euler = comfy.samplers.sampler_object("euler")

    def replay(which, mode, cfg=7.5, positive=src, lat=noise):
        (g,) = N["EditLabInversionGuider"].execute(model=model, inversion=which, positive=positive, negative=empty,
                                                   cfg=cfg, mode=mode, check_model=True).result
        with torch.inference_mode():
            return cs.SamplerCustomAdvanced().sample(cs.Noise_EmptyNoise(), g, euler, sigmas, lat)[0]["samples"]

    target = latent["samples"]
    quality = {
        "plain_cfg7.5 (drift baseline)": psnr(replay(inv, "plain")[:1], target),
        "plain_cfg1 (sanity)": psnr(replay(inv, "plain", cfg=1.0)[:1], target),
        "null-text": psnr(replay(tuned, "null-text")[:1], target),
        **({fast_label(args): psnr(replay(fast, "null-text")[:1], target)}
           if fast is not None else {}),
        "negative-prompt": psnr(replay(inv, "negative-prompt")[:1], target),
        "direct": psnr(replay(inv, "direct")[:1], target),
    }
    with torch.inference_mode():
        pair = [[torch.cat([src[0][0], edit[0][0]]), {}]]
    pair_noise = {"samples": noise["samples"].repeat(2, 1, 1, 1)}
    edit_times = interleaved_medians({
        "direct": lambda: replay(inv, "direct", positive=pair, lat=pair_noise),
        "plain": lambda: replay(inv, "plain", positive=pair, lat=pair_noise),
    }, args.repeats)
    stats = tuned.meta["null_text"]
    out_fast = {}
    if fast is not None:
        fs = fast.meta["null_text"]
        out_fast = {"fast": {"inner": args.fast_inner, "lr": args.fast_lr, "secant": args.fast_secant,
                             "secant_factor_median": fs["secant_factor_median"], "t_null_text_s": t_fast,
                             "forwards": fs["forwards"], "backwards": fs["backwards"], "iterations": fs["iterations"],
                             "null_psnr": quality[fast_label(args)]}}
    return {"t_invert_s": t_invert, "t_null_text_s": t_null, "forwards": stats["forwards"], **out_fast,
            "backwards": stats["backwards"], "iterations": stats["iterations"], "quality_latent_psnr_db": quality,
            "edit_s": edit_times, "ratio_direct_vs_plain_edit": edit_times["direct"] / edit_times["plain"],
            "latent": target, "null_psnr": quality["null-text"]}


def reference(env, args, target_latent, settings=None):
    """Mokady et al.'s null-text loop, re-implemented on diffusers (same weights, same image, fp32).

    ``settings``: a list of (inner steps, lr) to run on the one pivot (default: the paper's, (args.inner, 1e-2)).
    """
    settings = settings or [(args.inner, 1e-2)]
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from editlab.samplers.inversion import psnr
    import comfy.model_management as mm
    device = mm.get_torch_device()  # the same device ComfyUI runs our side on (fp32, as the paper prescribes)
    pipe = StableDiffusionPipeline.from_pretrained(str(env["diffusers_dir"]), local_files_only=True,
                                                   safety_checker=None, requires_safety_checker=False).to(device)
    # the notebook's scheduler; --ref-clean-end one lands the clean end at alpha 1 (sigma 0) like ComfyUI
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=args.ref_clean_end == "one", steps_offset=1)
    sched.set_timesteps(args.steps)
    unet, counts = pipe.unet, {"fwd": 0, "bwd": 0}
    tok = pipe.tokenizer

    def embed(text):
        ids = tok([text], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            return pipe.text_encoder(ids.to(device))[0]

    cond, uncond = embed(PROMPT), embed("")

    def eps(latent, t, context):
        counts["fwd"] += 1
        return unet(latent, t, encoder_hidden_states=context).sample

    a = sched.alphas_cumprod
    final = sched.final_alpha_cumprod
    step = sched.config.num_train_timesteps // args.steps

    def prev_step(out, t, sample):
        prev = t - step
        a_t, a_prev = a[t], (a[prev] if prev >= 0 else final)
        x0 = (sample - (1 - a_t) ** 0.5 * out) / a_t**0.5
        return a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * out

    def next_step(out, t, sample):
        t, t_next = min(t - step, 999), t
        a_t, a_next = (a[t] if t >= 0 else final), a[t_next]
        x0 = (sample - (1 - a_t) ** 0.5 * out) / a_t**0.5
        return a_next**0.5 * x0 + (1 - a_next) ** 0.5 * out

    latent = target_latent.float().to(device) * 0.18215
    with torch.no_grad():  # DDIM inversion (pivot)
        traj, cur = [latent], latent
        for i in range(args.steps):
            t = int(sched.timesteps[len(sched.timesteps) - i - 1])
            cur = next_step(eps(cur, t, cond), t, cur)
            traj.append(cur)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run(inner, lr):
        counts["fwd"], counts["bwd"] = 0, 0
        sync()
        t0 = time.perf_counter()
        nulls, cur, u, iterations = [], traj[-1], uncond, []
        for i in range(args.steps):
            u = u.clone().detach().requires_grad_(True)
            opt = torch.optim.Adam([u], lr=lr * (1.0 - i / 100.0))
            prev_target = traj[len(traj) - i - 2]
            t = int(sched.timesteps[i])
            with torch.no_grad():
                e_c = eps(cur, t, cond)
            for j in range(inner):
                e_u = eps(cur, t, u)
                rec = prev_step(e_u + 7.5 * (e_c - e_u), t, cur)
                loss = torch.nn.functional.mse_loss(rec, prev_target)
                opt.zero_grad()
                loss.backward()
                counts["bwd"] += 1
                opt.step()
                if loss.item() < 1e-5 + i * 2e-5:
                    break
            iterations.append(j + 1)
            nulls.append(u[:1].detach())
            with torch.no_grad():
                e = eps(torch.cat([cur] * 2), t, torch.cat([u, cond]))
                counts["fwd"] += 1  # the batched [uncond, cond] forward counts as two evaluations
                e_u, e_c = e.chunk(2)
                cur = prev_step(e_u + 7.5 * (e_c - e_u), t, cur)
        sync()
        t_null = time.perf_counter() - t0
        with torch.no_grad():  # replay with the optimised nulls
            cur = traj[-1]
            for i in range(args.steps):
                t = int(sched.timesteps[i])
                e_u = unet(cur, t, encoder_hidden_states=nulls[i]).sample
                e_c = unet(cur, t, encoder_hidden_states=cond).sample
                cur = prev_step(e_u + 7.5 * (e_c - e_u), t, cur)
        return {"inner": inner, "lr": lr, "t_null_text_s": t_null, "forwards": counts["fwd"],
                "backwards": counts["bwd"], "iterations": iterations, "clean_end": args.ref_clean_end,
                "null_psnr": psnr(cur.cpu() / 0.18215, target_latent.float())}

    runs = [run(inner, lr) for inner, lr in settings]
    return runs[0] if len(runs) == 1 else runs


def memory_phase(env, args, phase: str) -> None:
    import comfy.samplers
    import comfy_extras.nodes_custom_sampler as cs
    import nodes
    N = nodes.NODE_CLASS_MAPPINGS
    model, clip, vae = load(env)
    with torch.inference_mode():
        src = nodes.CLIPTextEncode().encode(clip, PROMPT)[0]
        empty = nodes.CLIPTextEncode().encode(clip, "")[0]
        (latent,) = nodes.VAEEncode().encode(vae, image(args.size))
        inv, noise, sigmas = N["EditLabDDIMInvert"].execute(model=model, positive=src, latent=latent, steps=args.mem_steps,
                                                            scheduler="ddim_uniform", guidance=1.0,
                                                            input_scaling="reference").result
    cuda = torch.cuda.is_available()
    if cuda:  # GPU: the device's peak allocation during the phase, in KiB
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.max_memory_allocated() // 1024
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.inference_mode():
        if phase == "plain":
            g = cs.CFGGuider().get_guider(model, src, empty, 7.5)[0]
            cs.SamplerCustomAdvanced().sample(cs.Noise_EmptyNoise(), g, comfy.samplers.sampler_object("euler"), sigmas, noise)
        else:
            N["EditLabNullTextOptimize"].execute(model=model, inversion=inv, negative=empty, guidance=7.5, inner_steps=2,
                                                 early_stop=0.0, early_stop_slope=0.0, learning_rate=1e-2,
                                                 check_model=True)
    peak = (torch.cuda.max_memory_allocated() // 1024) if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"phase": phase, "measure": "cuda max_memory_allocated" if cuda else "process max RSS",
                      "rss_before_kib": base, "peak_kib": peak}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--inner", type=int, default=10)
    ap.add_argument("--fast-inner", type=int, default=0,
                    help="also run both sides with this many inner steps at --fast-lr (0: skip)")
    ap.add_argument("--fast-lr", type=float, default=1e-2)
    ap.add_argument("--fast-secant", action="store_true",
                    help="EditLab side of the fast run: Null-Text Optimize's secant correction (the reference "
                         "side runs the paper's loop at the same inner steps and lr, which has none)")
    ap.add_argument("--image-seed", type=int, default=0, help="seed of the random input image")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mem-steps", type=int, default=5)
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--memory-phase", choices=["plain", "null-text"])
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--work", default=str(Path(__file__).resolve().parent / "out"))
    ap.add_argument("--ref-clean-end", choices=["alpha0", "one"], default="alpha0",
                    help="the reference's clean end: the notebook's final alpha = alphas_cumprod[0] (default) or "
                         "alpha 1 = sigma 0, EditLab's convention")
    ap.add_argument("--tame", type=float, default=1.0,
                    help="scale the UNet's output convolution by this factor (a smoother, trained-like eps)")
    ap.add_argument("--null-jitter", type=float, default=0.0,
                    help="add this relative, seeded noise to the empty-prompt embedding (sensitivity probe)")
    ap.add_argument("--jitter-seed", type=int, default=0)
    ap.add_argument("--bf16-unet", action="store_true",
                    help="EditLab side only: ComfyUI loads the UNet in bf16 (its --bf16-unet); the null and Adam stay fp32")
    ap.add_argument("--fp32-text-enc", action="store_true",
                    help="encode prompts in fp32 like the reference (ComfyUI's CPU default is fp16)")
    args = ap.parse_args()
    env = setup(args.work, eps_scale=args.tame)
    import comfy.cli_args
    comfy.cli_args.args.fp32_text_enc = args.fp32_text_enc
    comfy.cli_args.args.bf16_unet = args.bf16_unet
    if args.memory_phase:
        memory_phase(env, args, args.memory_phase)
        return
    mine = ours(env, args)
    report = {"machine": machine(), "fp32_text_encoder": args.fp32_text_enc, "tame": args.tame,
              "image_seed": args.image_seed,
              "bf16_unet_ours": args.bf16_unet, "size": args.size, "steps": args.steps, "inner": args.inner,
              "ours": {k: v for k, v in mine.items() if k not in ("latent",)}}
    if not args.skip_reference:
        if args.fast_inner:
            ref, ref_fast = reference(env, args, mine["latent"], [(args.inner, 1e-2), (args.fast_inner, args.fast_lr)])
            report["reference_fast"] = ref_fast
            fast = mine["fast"]["t_null_text_s"]
            report["null_text_speedup_ref_paper_over_ours_fast"] = ref["t_null_text_s"] / fast
            report["null_text_speedup_ref_fast_over_ours_fast"] = ref_fast["t_null_text_s"] / fast
        else:
            ref = reference(env, args, mine["latent"])
        report["reference"] = ref
        report["null_text_speedup_ref_over_ours"] = ref["t_null_text_s"] / mine["t_null_text_s"]
    if args.skip_memory:
        print(json.dumps(report, indent=1, default=lambda o: float(o) if not math.isinf(float(o)) else "inf"))
        return
    mem = {}
    for phase in ("plain", "null-text"):
        out = subprocess.run([sys.executable, __file__, "--memory-phase", phase, "--size", str(args.size),
                              "--work", args.work, "--tame", str(args.tame)], capture_output=True, text=True, check=True)
        mem[phase] = json.loads(out.stdout.strip().splitlines()[-1])
    grow = {k: v["peak_kib"] - v["rss_before_kib"] for k, v in mem.items()}
    report["memory"] = {"peak_rss_kib": {k: v["peak_kib"] for k, v in mem.items()}, "growth_kib": grow,
                        "ratio_peak_null_text_vs_plain": mem["null-text"]["peak_kib"] / mem["plain"]["peak_kib"]}
    print(json.dumps(report, indent=1, default=lambda o: float(o) if not math.isinf(float(o)) else "inf"))


if __name__ == "__main__":
    main()
