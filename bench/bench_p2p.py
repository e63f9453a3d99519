"""Prompt-to-Prompt benchmark (issue 4): step time and peak memory of a controlled [source, target] batch.

Contenders, on the same random SD1.5-architecture weights, the same [source, target] word swap
(cross 0.8, self 0.4) and the same number of UNet evaluations per step (one batched CFG call):

- ``comfy_plain``: the same batch sampled by ComfyUI without the controller (overhead baseline);
- ``comfy_p2p``: EditLab's Attention Controller (word swap);
- ``comfy_p2p_blend``: the same plus local blend (maps materialised at one resolution);
- ``reference_p2p``: the reference controller re-implemented on the diffusers UNet (bench/p2p_reference.py,
  every attention probability materialised, maps <= 32x32 stored every step, DDIM loop);
- ``diffusers_plain``: the same diffusers loop with diffusers' default attention processor.

Time: interleaved medians in one process. Peak memory: on CUDA, ``max_memory_allocated`` above the
loaded-model baseline; on CPU, each contender runs once in a fresh child process and reports the rise of
its peak resident set during sampling (``VmHWM`` reset through ``/proc/self/clear_refs``) over the resident
set before sampling.

    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_p2p.py [--latent 32] [--steps 10] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import _status_kib, interleaved_medians, machine, setup  # noqa: E402

SOURCE, TARGET = "a photo of a cat riding a bicycle", "a photo of a dog riding a bicycle"
CONTENDERS = ["comfy_plain", "comfy_p2p", "comfy_p2p_blend", "reference_p2p", "diffusers_plain"]


def build(args) -> dict:
    """Every contender as a zero-argument callable that samples once."""
    env = setup(args.work, full_size=getattr(args, "full_size", False))  # gpu_tier.py: full-size weights
    import nodes
    import comfy.samplers
    import comfy_extras.nodes_custom_sampler as cs
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor
    from transformers import CLIPTextModel, CLIPTokenizer

    import p2p_reference

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with torch.inference_mode():
        model, clip, _ = nodes.CheckpointLoaderSimple().load_checkpoint(env["checkpoint"])[:3]
    enc, batch, ctrl = (nodes.NODE_CLASS_MAPPINGS[k] for k in (
        "EditLabPromptPairEncode", "EditLabP2PLatentBatch", "EditLabAttentionController"))

    def encode(blend: str):
        return enc.execute(clip=clip, source=SOURCE, target=TARGET, mode="replace", reweight_words="",
                           reweight_factor=2.0, blend_words=blend, cross_replace_words="").result

    with torch.inference_mode():
        cond, edit = encode("")
        cond_b, edit_b = encode("cat, dog")
        neg = nodes.CLIPTextEncode().encode(clip, "")[0]
        (latent,) = batch.execute(latent={"samples": torch.zeros(1, 4, args.latent, args.latent)}, edit=edit).result
        controlled = ctrl.execute(model=model, edit=edit, cross_replace_steps=0.8, self_replace_steps=0.4,
                                  self_attention_max_size=16, map_size=16, blend_threshold=0.3,
                                  start_blend=0.2).result[0]
        blended = ctrl.execute(model=model, edit=edit_b, cross_replace_steps=0.8, self_replace_steps=0.4,
                               self_attention_max_size=16, map_size=16, blend_threshold=0.3,
                               start_blend=0.2).result[0]
        sigmas = cs.BasicScheduler().get_sigmas(model, "ddim_uniform", args.steps, 1.0)[0]
    euler = comfy.samplers.sampler_object("euler")

    def comfy_run(m, c):
        guider = cs.CFGGuider().get_guider(m, c, neg, 7.5)[0]

        def go():
            with torch.inference_mode():
                return cs.SamplerCustomAdvanced().sample(cs.Noise_RandomNoise(0), guider, euler, sigmas,
                                                         latent)[0]["samples"]
        return go

    # -- diffusers twin ---------------------------------------------------------------------------
    ddir = env["diffusers_dir"]
    unet = UNet2DConditionModel.from_pretrained(str(ddir / "unet")).to(device).eval()
    text = CLIPTextModel.from_pretrained(str(ddir / "text_encoder")).to(device).eval()
    tok = CLIPTokenizer.from_pretrained(str(ddir / "tokenizer"))
    sched = DDIMScheduler.from_pretrained(str(ddir / "scheduler"))

    def embed(prompts):
        ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            return text(ids.to(device))[0]

    d_cond, d_uncond = embed([SOURCE, TARGET]), embed([""])
    noise = torch.randn(1, 4, args.latent, args.latent, generator=torch.Generator().manual_seed(0)).to(device)
    d_latent = noise.expand(2, -1, -1, -1).clone()
    mapper = edit.base.clone()

    def diffusers_run(reference: bool):
        def go():
            if reference:
                p2p_reference.install(unet, lambda n: p2p_reference.ReferenceReplaceController(
                    2, args.steps, mapper, 0.8, 0.4, n))
            else:
                unet.set_attn_processor(AttnProcessor())
            return p2p_reference.sample(unet, sched, d_cond, d_uncond, d_latent, args.steps, 7.5)
        return go

    return {
        "comfy_plain": comfy_run(model, cond),
        "comfy_p2p": comfy_run(controlled, cond),
        "comfy_p2p_blend": comfy_run(blended, cond_b),
        "reference_p2p": diffusers_run(True),
        "diffusers_plain": diffusers_run(False),
    }


def peak_of(fn) -> float:
    """MiB of memory above the baseline at the peak of one run (see the module doc)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    import gc
    gc.collect()
    with open("/proc/self/clear_refs", "w") as fh:  # Linux: reset the peak resident set (VmHWM) to now
        fh.write("5")
    base = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - base) / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--latent", type=int, default=32, help="latent side (64 = 512 px)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", default=str(Path(__file__).resolve().parent / "out"))
    ap.add_argument("--child", choices=CONTENDERS, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:  # one contender, one run, fresh process: its peak memory
        fns = build(args)
        print(json.dumps({"peak_mib": peak_of(fns[args.child])}))
        return

    fns = build(args)
    times = interleaved_medians(fns, args.repeats)
    if torch.cuda.is_available():
        peaks = {k: peak_of(f) for k, f in fns.items()}
    else:
        peaks = {}
        for k in CONTENDERS:
            cmd = [sys.executable, __file__, "--child", k, "--latent", str(args.latent), "--steps", str(args.steps),
                   "--work", args.work]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            peaks[k] = json.loads(out)["peak_mib"]
    step = {k: v / args.steps for k, v in times.items()}
    report = {
        "machine": machine(), "latent": args.latent, "steps": args.steps, "repeats": args.repeats,
        "step_s": step, "peak_mib": peaks,
        "time_ratio_p2p_vs_plain": step["comfy_p2p"] / step["comfy_plain"],
        "time_ratio_p2p_blend_vs_plain": step["comfy_p2p_blend"] / step["comfy_plain"],
        "mem_ratio_p2p_vs_plain": peaks["comfy_p2p"] / max(peaks["comfy_plain"], 1e-9),
        "mem_ratio_p2p_blend_vs_plain": peaks["comfy_p2p_blend"] / max(peaks["comfy_plain"], 1e-9),
        "time_ratio_p2p_vs_reference": step["comfy_p2p"] / step["reference_p2p"],
        "mem_ratio_p2p_vs_reference": peaks["comfy_p2p"] / max(peaks["reference_p2p"], 1e-9),
        "time_ratio_reference_vs_diffusers_plain": step["reference_p2p"] / step["diffusers_plain"],
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
