"""SDEdit benchmarks (issue: foundation).

1. Sampler overhead: EditLab's Reverse SDE sampler vs ComfyUI's native samplers with the same number of
   model evaluations (stochastic vs euler_ancestral, deterministic vs euler), same graph otherwise.
2. SDEdit end to end (encode prompt + VAE encode + perturb + sample + VAE decode) vs diffusers'
   StableDiffusionImg2ImgPipeline (DDIM, one UNet call per step) at equal UNet evaluations, same weights.

    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_sdedit.py [--size 256] [--steps 20] [--repeats 5]
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256, help="image size in px")
    ap.add_argument("--steps", type=int, default=20, help="denoising steps actually run")
    ap.add_argument("--t0", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--work", default=str(Path(__file__).resolve().parent / "out"))
    ap.add_argument("--comfy-fp16-text-encoder", action="store_true",
                    help="keep ComfyUI's CPU default (fp16 text encoder, slow on CPUs); default is --fp32-text-enc")
    args = ap.parse_args()
    env = setup(args.work)
    import comfy.cli_args
    # On a CPU, ComfyUI's default text-encoder dtype is fp16, which CPUs run slowly; diffusers runs fp32.
    # Like starting ComfyUI with --fp32-text-enc, so both sides encode prompts in fp32.
    comfy.cli_args.args.fp32_text_enc = not args.comfy_fp16_text_encoder

    import nodes
    import comfy.samplers
    import comfy_extras.nodes_custom_sampler as cs
    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline
    from PIL import Image

    torch.manual_seed(0)
    with torch.inference_mode():
        model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(env["checkpoint"])[:3]
    prompt, negative = "a photo of a mountain lake at sunset", ""
    rng = np.random.default_rng(0)
    pixels = rng.random((args.size, args.size, 3)).astype(np.float32)
    image = torch.from_numpy(pixels)[None]
    perturb = nodes.NODE_CLASS_MAPPINGS["EditLabSDEPerturb"]
    reverse = nodes.NODE_CLASS_MAPPINGS["EditLabReverseSDESampler"]

    def encode_conds():
        enc = nodes.CLIPTextEncode()
        return enc.encode(clip, prompt)[0], enc.encode(clip, negative)[0]

    with torch.inference_mode():
        pos, neg = encode_conds()
        (latent,) = nodes.VAEEncode().encode(vae, image)
        noised, sigmas = perturb.execute(model=model, latent=latent, t0=args.t0, steps=args.steps,
                                         scheduler="ddim_uniform", seed=0).result
    guider = cs.CFGGuider().get_guider(model, pos, neg, 7.5)[0]

    def run_sampler(sampler):
        def go():
            with torch.inference_mode():
                return cs.SamplerCustomAdvanced().sample(cs.Noise_EmptyNoise(), guider, sampler, sigmas, noised)
        return go

    ours_sto = reverse.execute(mode="stochastic", seed=0, repeat=1).result[0]
    ours_det = reverse.execute(mode="deterministic", seed=0, repeat=1).result[0]
    overhead = interleaved_medians({
        "editlab_stochastic": run_sampler(ours_sto),
        "native_euler_ancestral": run_sampler(comfy.samplers.sampler_object("euler_ancestral")),
        "editlab_deterministic": run_sampler(ours_det),
        "native_euler": run_sampler(comfy.samplers.sampler_object("euler")),
    }, args.repeats)

    # -- end to end vs diffusers img2img --------------------------------------------------------
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(str(env["diffusers_dir"]), local_files_only=True,
                                                          safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pil = Image.fromarray((pixels * 255).astype(np.uint8))
    total_steps = int(round(args.steps / args.t0))  # diffusers runs int(num_inference_steps * strength)

    def diffusers_e2e():
        with torch.inference_mode():
            return pipe(prompt, image=pil, strength=args.t0, num_inference_steps=total_steps, guidance_scale=7.5,
                        negative_prompt=negative, generator=torch.Generator().manual_seed(0), output_type="np").images

    def editlab_e2e():
        with torch.inference_mode():
            p, n = encode_conds()
            (lat,) = nodes.VAEEncode().encode(vae, image)
            x, sig = perturb.execute(model=model, latent=lat, t0=args.t0, steps=args.steps,
                                     scheduler="ddim_uniform", seed=0).result
            g = cs.CFGGuider().get_guider(model, p, n, 7.5)[0]
            out = cs.SamplerCustomAdvanced().sample(cs.Noise_EmptyNoise(), g, ours_det, sig, x)[0]
            return nodes.VAEDecode().decode(vae, out)[0]

    unet_calls = {"n": 0}
    hook = pipe.unet.register_forward_hook(lambda *a: unet_calls.__setitem__("n", unet_calls["n"] + 1))
    diffusers_e2e()
    hook.remove()
    e2e = interleaved_medians({"editlab_sdedit": editlab_e2e, "diffusers_img2img": diffusers_e2e}, args.repeats)

    report = {
        "machine": machine(), "fp32_text_encoder": not args.comfy_fp16_text_encoder, "size": args.size, "steps": args.steps, "t0": args.t0, "repeats": args.repeats,
        "sampler_overhead_s": overhead,
        "ratio_stochastic_vs_euler_ancestral": overhead["editlab_stochastic"] / overhead["native_euler_ancestral"],
        "ratio_deterministic_vs_euler": overhead["editlab_deterministic"] / overhead["native_euler"],
        "diffusers_unet_calls": unet_calls["n"], "editlab_steps": len(sigmas) - 1,
        "e2e_s": e2e, "ratio_e2e_editlab_vs_diffusers": e2e["editlab_sdedit"] / e2e["diffusers_img2img"],
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
