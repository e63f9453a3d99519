"""Dual CFG / InstructPix2Pix benchmarks (issue 5), on the random 8-channel SD1.5-architecture IP2P weights.

1. Parity: InstructPix2Pix Encode + Dual CFG Combiner + euler/simple vs diffusers'
   StableDiffusionInstructPix2PixPipeline + EulerDiscreteScheduler(timestep_spacing="trailing"), same initial
   noise, fp32 (ComfyUI's text encoder loaded in fp32): max abs error of the final latents and images.
2. Step time: our combiner vs ComfyUI's DualCFGGuider ("regular"), same conds, sampler and sigmas.
3. End to end at equal steps (text + image encode, sampling, decode): ours vs the diffusers pipeline.
4. Peak resident memory added by each contender (Linux: RSS polled every 2 ms while it runs).

    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_dual_cfg.py [--size 64] [--steps 8] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_medians, machine, setup  # noqa: E402

INSTRUCTION = "make it a watercolor painting"


def peak_rss_mib(fn, interval: float = 0.002) -> float:
    """Peak resident memory added while ``fn`` runs (MiB): RSS polled from /proc/self/statm by a thread."""
    import os
    import threading
    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * page

    base, peak, done = rss(), [0], threading.Event()

    def poll() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            done.wait(interval)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return (max(peak[0], rss()) - base) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=64, help="image size in px (multiple of 8)")
    ap.add_argument("--steps", type=int, default=8, help="sampling steps (a divisor of 1000 for the parity)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--s-t", type=float, default=7.5)
    ap.add_argument("--s-i", type=float, default=1.5)
    ap.add_argument("--work", default=str(Path(__file__).resolve().parent / "out"))
    args = ap.parse_args()
    env = setup(args.work, in_channels=8)

    import comfy.samplers
    import comfy.sd
    import comfy_extras.nodes_custom_sampler as cs
    import folder_paths
    import nodes
    from diffusers import EulerDiscreteScheduler, StableDiffusionInstructPix2PixPipeline
    from PIL import Image

    with torch.inference_mode():
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(
            folder_paths.get_full_path_or_raise("checkpoints", env["checkpoint"]), output_vae=True, output_clip=True,
            te_model_options={"dtype": torch.float32})[:3]
    encode = nodes.NODE_CLASS_MAPPINGS["EditLabInstructPix2PixEncode"]
    combine = nodes.NODE_CLASS_MAPPINGS["EditLabDualCFGCombiner"]
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(str(env["diffusers_dir"]), local_files_only=True,
                                                                  safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    pipe.set_progress_bar_config(disable=True)

    pixels = (np.random.default_rng(0).random((args.size, args.size, 3)) * 255).astype(np.uint8)
    pil = Image.fromarray(pixels)
    image = torch.from_numpy(pixels.astype(np.float32) / 255.0)[None]
    lat = args.size // 8
    z = torch.randn(1, 4, lat, lat, generator=torch.Generator().manual_seed(42))
    euler = comfy.samplers.sampler_object("euler")

    def our_guider(levels):
        both, image_only, neither, _ = levels
        return combine.execute(model=model, both=both, base_only=image_only, neither=neither, extra_scale=args.s_t,
                               base_scale=args.s_i, schedule="constant", extra_scale_end=args.s_t,
                               base_scale_end=args.s_i, rescale=0.0).result[0]

    def our_levels():
        return encode.execute(clip=clip, vae=vae, image=image, instruction=INSTRUCTION, negative="",
                              size_fit="crop").result

    with torch.inference_mode():
        levels = our_levels()
        sigmas = cs.BasicScheduler().get_sigmas(model, "simple", args.steps, 1.0)[0]
    start = {"samples": model.get_model_object("process_latent_out")(z * float(sigmas[0]))}
    ours = our_guider(levels)
    native = cs.DualCFGGuider().get_guider(model, levels[0], levels[1], levels[2], args.s_t, args.s_i, "regular")[0]

    def sample(guider):
        def go():
            with torch.inference_mode():
                return cs.SamplerCustomAdvanced().sample(cs.Noise_EmptyNoise(), guider, euler, sigmas, start)[0]
        return go

    def editlab_e2e():
        with torch.inference_mode():
            lv = our_levels()
            out = cs.SamplerCustomAdvanced().sample(cs.Noise_EmptyNoise(), our_guider(lv), euler, sigmas, start)[0]
            return nodes.VAEDecode().decode(vae, out)[0]

    def diffusers_e2e():
        with torch.inference_mode():
            return pipe(INSTRUCTION, image=pil, num_inference_steps=args.steps, guidance_scale=args.s_t,
                        image_guidance_scale=args.s_i, latents=z.clone(), output_type="np").images

    # 1. parity
    with torch.inference_mode():
        ref = pipe(INSTRUCTION, image=pil, num_inference_steps=args.steps, guidance_scale=args.s_t,
                   image_guidance_scale=args.s_i, latents=z.clone(), output_type="latent").images
    mine = model.get_model_object("process_latent_in")(sample(ours)()["samples"])
    ref_img = diffusers_e2e()[0]
    our_img = editlab_e2e()[0].numpy()
    parity = {"latent_max_abs": float((mine - ref).abs().max()), "latent_ref_absmax": float(ref.abs().max()),
              "latent_rel": float((mine - ref).abs().max() / ref.abs().max()),
              "image_max_abs": float(np.abs(our_img - ref_img).max())}

    # 2-3. timing, interleaved; 4. peak memory, one run each
    sampling = interleaved_medians({"editlab_combiner": sample(ours), "comfy_dual_cfg_guider": sample(native)},
                                   args.repeats)
    unet_calls = {"n": 0}
    hook = pipe.unet.register_forward_hook(lambda *a: unet_calls.__setitem__("n", unet_calls["n"] + 1))
    diffusers_e2e()
    hook.remove()
    e2e = interleaved_medians({"editlab_ip2p": editlab_e2e, "diffusers_ip2p": diffusers_e2e}, args.repeats)
    memory = {"editlab_combiner_sampling": peak_rss_mib(sample(ours)),
              "comfy_dual_cfg_guider_sampling": peak_rss_mib(sample(native)),
              "editlab_ip2p_e2e": peak_rss_mib(editlab_e2e), "diffusers_ip2p_e2e": peak_rss_mib(diffusers_e2e)}

    report = {
        "machine": machine(), "size": args.size, "steps": args.steps, "s_T": args.s_t, "s_I": args.s_i,
        "repeats": args.repeats, "parity_fp32": parity,
        "sampling_s": sampling,
        "step_s": {k: v / args.steps for k, v in sampling.items()},
        "ratio_step_combiner_vs_dual_cfg_guider": sampling["editlab_combiner"] / sampling["comfy_dual_cfg_guider"],
        "diffusers_unet_calls": unet_calls["n"], "e2e_s": e2e,
        "ratio_e2e_editlab_vs_diffusers": e2e["editlab_ip2p"] / e2e["diffusers_ip2p"],
        "peak_rss_added_mib": memory,
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
