"""The GPU tier's rows (bench/gpu_tier.py): one function per benchmark, each returning one :class:`Row`.

Each builds that benchmark's contenders as its script does (or imports them: ``bench_p2p.build``,
``bench_inversion.ours`` / ``reference``) and measures them with ``common``'s timer and memory probe.
ComfyUI and torch are imported inside the functions, so importing this module stays cheap.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable


@dataclass
class Row:
    benchmark: str
    ours: str
    baseline: str
    ours_ms: float = float("nan")  # per step
    base_ms: float = float("nan")
    ours_mib: float = float("nan")
    base_mib: float = float("nan")
    dtype: str = ""
    note: str = ""
    seconds: float = 0.0
    error: str = ""
    extra: dict = field(default_factory=dict)


# -- the benchmarks (each returns one Row) ---------------------------------------------------------------

def synced(fns: dict[str, Callable[[], object]]) -> dict[str, Callable[[], object]]:
    """Each callable followed by a device synchronisation, so queued CUDA work is timed where it was queued."""
    import torch
    if not torch.cuda.is_available():
        return fns

    def wrap(fn: Callable[[], object]) -> Callable[[], object]:
        def go():
            out = fn()
            torch.cuda.synchronize()
            return out
        return go
    return {k: wrap(f) for k, f in fns.items()}


def measure(cfg, fns: dict[str, Callable[[], object]]) -> tuple[dict[str, float], dict[str, float]]:
    """(median seconds, peak MiB) per contender. GPU tier: ``interleaved_medians`` after a warm-up, then one
    run each for the peak. Smoke: one run each that gives both (the numbers only show the script works)."""
    from common import interleaved_medians, run_with_peak as peak_of
    if cfg.smoke:
        times, peaks = {}, {}
        for key, fn in fns.items():
            t = time.perf_counter()
            peaks[key] = peak_of(fn)[1]
            times[key] = time.perf_counter() - t
        return times, peaks
    times = interleaved_medians(fns, cfg.repeats, cfg.warmup)
    return times, {key: peak_of(fn)[1] for key, fn in fns.items()}


def _dtype(model) -> str:
    return str(model.model.get_dtype()).replace("torch.", "")


def bench_sdedit(cfg, env) -> Row:
    import comfy.samplers
    import comfy_extras.nodes_custom_sampler as cs
    import nodes
    import torch
    row = Row("SDEdit", "Reverse SDE Sampler, stochastic", "ComfyUI euler_ancestral")
    with torch.inference_mode():
        model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(env["checkpoint"])[:3]
        enc = nodes.CLIPTextEncode()
        pos, neg = enc.encode(clip, "a photo of a mountain lake at sunset")[0], enc.encode(clip, "")[0]
        image = torch.rand(1, cfg.size, cfg.size, 3, generator=torch.Generator().manual_seed(0))
        (latent,) = nodes.VAEEncode().encode(vae, image)
        noised, sigmas = nodes.NODE_CLASS_MAPPINGS["EditLabSDEPerturb"].execute(
            model=model, latent=latent, t0=0.5, steps=cfg.steps, scheduler="ddim_uniform", seed=0).result
    guider = cs.CFGGuider().get_guider(model, pos, neg, 7.5)[0]
    ours = nodes.NODE_CLASS_MAPPINGS["EditLabReverseSDESampler"].execute(mode="stochastic", seed=0, repeat=1).result[0]

    def run(sampler) -> Callable[[], object]:
        def go():
            with torch.inference_mode():
                return cs.SamplerCustomAdvanced().sample(cs.Noise_EmptyNoise(), guider, sampler, sigmas, noised)
        return go
    fns = synced({"ours": run(ours), "base": run(comfy.samplers.sampler_object("euler_ancestral"))})
    t, peak = measure(cfg, fns)
    steps = len(sigmas) - 1
    row.ours_ms, row.base_ms = 1e3 * t["ours"] / steps, 1e3 * t["base"] / steps
    row.ours_mib, row.base_mib = peak["ours"], peak["base"]
    row.dtype, row.note = _dtype(model), f"t0 0.5, {steps} steps, CFG 7.5"
    return row


def bench_inversion(cfg, env) -> Row:
    import bench_inversion as bi
    from common import run_with_peak
    row = Row("Inversion", "Null-Text Optimize", "reference null-text loop (diffusers, fp32)")
    args = SimpleNamespace(size=cfg.size, steps=cfg.inv_steps, inner=cfg.inner, fast_inner=0, fast_lr=1e-2,
                           fast_secant=False, image_seed=0, repeats=1, null_jitter=0.0, jitter_seed=0,
                           ref_clean_end="alpha0")
    mine, row.ours_mib = run_with_peak(lambda: bi.ours(env, args))
    ref, row.base_mib = run_with_peak(lambda: bi.reference(env, args, mine["latent"]))
    row.ours_ms, row.base_ms = 1e3 * mine["t_null_text_s"] / args.steps, 1e3 * ref["t_null_text_s"] / args.steps
    import comfy.model_management as mm
    row.dtype = f"{str(mm.unet_dtype()).replace('torch.', '')} / fp32"
    row.note = (f"{args.steps} steps x <= {args.inner} inner, lr 1e-2; "
                f"fwd/bwd {mine['forwards']}/{mine['backwards']} vs "
                f"{ref['forwards']}/{ref['backwards']}; PSNR {mine['null_psnr']:.1f} vs {ref['null_psnr']:.1f} dB; "
                "peak includes the weights each side loads")
    return row


def bench_p2p(cfg, env) -> Row:
    import bench_p2p as bp
    row = Row("Prompt-to-Prompt", "Attention Controller, word swap", "same batch, no controller")
    fns = synced(bp.build(SimpleNamespace(latent=cfg.size // 8, steps=cfg.steps, work=str(cfg.work),
                                          full_size=cfg.full_size)))
    keys = ("comfy_p2p", "comfy_plain", "reference_p2p")
    t, peak = measure(cfg, {k: fns[k] for k in keys})
    row.ours_ms, row.base_ms = 1e3 * t["comfy_p2p"] / cfg.steps, 1e3 * t["comfy_plain"] / cfg.steps
    row.ours_mib, row.base_mib = peak["comfy_p2p"], peak["comfy_plain"]
    import comfy.model_management as mm
    row.dtype = str(mm.unet_dtype()).replace("torch.", "")
    row.note = (f"cross 0.8 / self 0.4, {cfg.steps} steps; vs the reference controller on diffusers (fp32): "
                f"time {t['comfy_p2p'] / t['reference_p2p']:.2f}, memory "
                f"{peak['comfy_p2p'] / max(peak['reference_p2p'], 1e-9):.2f}")
    return row


def bench_dual_cfg(cfg, env8) -> Row:
    import comfy.samplers
    import comfy_extras.nodes_custom_sampler as cs
    import nodes
    import torch
    row = Row("Dual CFG", "Dual CFG Combiner", "ComfyUI DualCFGGuider (regular)")
    s_t, s_i = 7.5, 1.5
    with torch.inference_mode():
        model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(env8["checkpoint"])[:3]
        image = torch.rand(1, cfg.size, cfg.size, 3, generator=torch.Generator().manual_seed(0))
        both, image_only, neither, _ = nodes.NODE_CLASS_MAPPINGS["EditLabInstructPix2PixEncode"].execute(
            clip=clip, vae=vae, image=image, instruction="make it a watercolor painting", negative="",
            size_fit="crop").result
        sigmas = cs.BasicScheduler().get_sigmas(model, "simple", cfg.steps, 1.0)[0]
    ours = nodes.NODE_CLASS_MAPPINGS["EditLabDualCFGCombiner"].execute(
        model=model, both=both, base_only=image_only, neither=neither, extra_scale=s_t, base_scale=s_i,
        schedule="constant", extra_scale_end=s_t, base_scale_end=s_i, rescale=0.0).result[0]
    native = cs.DualCFGGuider().get_guider(model, both, image_only, neither, s_t, s_i, "regular")[0]
    z = torch.randn(1, 4, cfg.size // 8, cfg.size // 8, generator=torch.Generator().manual_seed(42))
    start = {"samples": model.get_model_object("process_latent_out")(z * float(sigmas[0]))}
    euler = comfy.samplers.sampler_object("euler")

    def run(guider) -> Callable[[], object]:
        def go():
            with torch.inference_mode():
                return cs.SamplerCustomAdvanced().sample(cs.Noise_EmptyNoise(), guider, euler, sigmas, start)
        return go
    fns = synced({"ours": run(ours), "base": run(native)})
    t, peak = measure(cfg, fns)
    row.ours_ms, row.base_ms = 1e3 * t["ours"] / cfg.steps, 1e3 * t["base"] / cfg.steps
    row.ours_mib, row.base_mib = peak["ours"], peak["base"]
    row.dtype, row.note = _dtype(model), f"s_T {s_t}, s_I {s_i}, {cfg.steps} steps, one batch-3 call per step"
    return row


def bench_subject(cfg, env) -> Row:
    import comfy.samplers
    import comfy_extras.nodes_custom_sampler as cs
    import comfy.model_management as mm
    import nodes
    import torch
    from editlab.guidance.subject import Subject, SubjectEncoder, SubjectEncoderConfig
    row = Row("Subject", "Subject Prompt generation (after encoding)", "plain text-to-image")
    note = ""
    if cfg.smoke:  # the real-size encoder (494 M) takes longer to build than the smoke budget; timing is
        embeds = 0.02 * torch.randn(16, 768, generator=torch.Generator().manual_seed(0))  # the same either way
    else:
        torch.manual_seed(0)
        device = mm.get_torch_device()
        encoder = SubjectEncoder(SubjectEncoderConfig()).eval().to(device)
        pixels, ids = torch.randn(1, 3, 224, 224, device=device), torch.tensor([[101, 3899, 102]], device=device)
        with torch.inference_mode():
            encoder(pixels, ids)  # warm-up
            t = time.perf_counter()
            embeds = encoder(pixels, ids)[0]
            if device.type == "cuda":
                torch.cuda.synchronize()
            note = f"; encoding (494 M, fp32) {1e3 * (time.perf_counter() - t):.0f} ms once per image"
        del encoder
    subject = Subject(embeds.float().cpu(), "dog", "bench")
    with torch.inference_mode():
        model, clip, _ = nodes.CheckpointLoaderSimple().load_checkpoint(env["checkpoint"])[:3]
        pos_s, neg_s, _report = nodes.NODE_CLASS_MAPPINGS["EditLabSubjectPrompt"].execute(
            clip=clip, subject=subject, prompt="swimming underwater", target_class="", prompt_strength=1.0,
            prompt_reps=20, negative_prompt="").result
        pos_t = nodes.CLIPTextEncode().encode(clip, "a dog swimming underwater")[0]
        neg_t = nodes.CLIPTextEncode().encode(clip, "")[0]
    latent = {"samples": torch.zeros(1, 4, cfg.size // 8, cfg.size // 8)}
    sigmas = cs.BasicScheduler().get_sigmas(model, "normal", cfg.steps, 1.0)[0]
    euler = comfy.samplers.sampler_object("euler")

    def run(pos, neg) -> Callable[[], object]:
        def go():
            guider = cs.CFGGuider().get_guider(model, pos, neg, 7.5)[0]
            with torch.inference_mode():
                return cs.SamplerCustomAdvanced().sample(cs.Noise_RandomNoise(0), guider, euler, sigmas, latent)
        return go
    fns = synced({"ours": run(pos_s, neg_s), "base": run(pos_t, neg_t)})
    t, peak = measure(cfg, fns)
    row.ours_ms, row.base_ms = 1e3 * t["ours"] / cfg.steps, 1e3 * t["base"] / cfg.steps
    row.ours_mib, row.base_mib = peak["ours"], peak["base"]
    row.dtype, row.note = _dtype(model), f"{cfg.steps} steps, CFG 7.5{note}"
    return row


def bench_dreambooth(cfg, env) -> Row:
    """bench_dreambooth.py's contenders: DreamBooth Train (1 instance + 1 class row, prior preservation) vs
    ComfyUI's Train LoRA (batch 2 of instance rows), same LoRA rank 8, lr 1e-4, fp32 training, no checkpointing."""
    import nodes
    import torch
    row = Row("DreamBooth", "DreamBooth Train (LoRA, prior preservation)", "ComfyUI Train LoRA")
    with torch.inference_mode():
        model, clip, _ = nodes.CheckpointLoaderSimple().load_checkpoint(env["checkpoint"])[:3]
        inst_cond = nodes.CLIPTextEncode().encode(clip, "a vzk dog")[0]
        cls_cond = nodes.CLIPTextEncode().encode(clip, "a dog")[0]
    side, g = cfg.size // 8, torch.Generator().manual_seed(0)
    instance = {"samples": torch.randn((4, 4, side, side), generator=g)}
    classes = {"samples": torch.randn((8, 4, side, side), generator=g)}
    core, ours = nodes.NODE_CLASS_MAPPINGS["TrainLoraNode"](), nodes.NODE_CLASS_MAPPINGS["EditLabDreamBoothTrain"]

    def run_core():
        with torch.inference_mode():
            return core.train(model, instance, inst_cond, 2, cfg.steps, 1, 1e-4, 8, "AdamW", "MSE", 0, "fp32",
                              "fp32", "LoRA", False, "[None]")

    def run_ours():
        with torch.inference_mode():
            return ours.execute(model=model, instance_latents=instance, instance_conditioning=inst_cond,
                                class_latents=classes, class_conditioning=cls_cond, prior_loss_weight=1.0,
                                steps=cfg.steps, learning_rate=1e-4, rank=8, algorithm="LoRA", loss_target="model",
                                batch_size=1, seed=0, gradient_checkpointing=False, save_every=0,
                                checkpoint_name="bench", resume=False).result
    fns = synced({"ours": run_ours, "base": run_core})
    t, peak = measure(cfg, fns)
    row.ours_ms, row.base_ms = 1e3 * t["ours"] / cfg.steps, 1e3 * t["base"] / cfg.steps
    row.ours_mib, row.base_mib = peak["ours"], peak["base"]
    row.dtype, row.note = "fp32 training", f"{cfg.steps} optimizer steps of 2 rows, rank 8"
    return row


TITLES = {"sdedit": "SDEdit", "inversion": "Inversion", "p2p": "Prompt-to-Prompt", "dual_cfg": "Dual CFG",
          "subject": "Subject", "dreambooth": "DreamBooth"}
RUNNERS = {"sdedit": bench_sdedit, "inversion": bench_inversion, "p2p": bench_p2p, "dual_cfg": bench_dual_cfg,
           "subject": bench_subject, "dreambooth": bench_dreambooth}
