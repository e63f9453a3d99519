"""Self-check for ``random_models.py``.

Usage::

    COMFYUI_PATH=/opt/ComfyUI python tests/support/check_random_models.py [--quick]

Builds 4- and 8-channel checkpoints in a temp dir, loads them with ComfyUI's
``load_checkpoint_guess_config``, samples one step, converts to diffusers,
prints parity numbers and runs diffusers pipelines for 2 steps at 64x64.
Exits non-zero on any failed check.  ``--quick`` only does the 4-channel model.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import random_models as rm  # noqa: E402
from model_checks import assert_models_differ  # noqa: E402

FAILURES: list[str] = []


def check(cond: bool, msg: str) -> None:
    print(("  ok   " if cond else "  FAIL ") + msg)
    if not cond:
        FAILURES.append(msg)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def comfy_one_step(model: Any, clip: Any, vae: Any, in_channels: int) -> None:
    import comfy.sample

    tokens = clip.tokenize("a red apple on a table")
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    ncond, npooled = clip.encode_from_tokens(clip.tokenize(""), return_pooled=True)
    check(bool(torch.isfinite(cond).all()), f"CLIP cond finite, std={cond.std().item():.3f}")
    extra: dict[str, Any] = {}
    if in_channels == 8:
        extra["concat_latent_image"] = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3)) * 0.5
    positive = [[cond, {"pooled_output": pooled, **extra}]]
    negative = [[ncond, {"pooled_output": npooled, **extra}]]
    latent = torch.zeros(1, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, 0)
    t0 = time.perf_counter()
    samples = comfy.sample.sample(model, noise, 1, 7.0, "euler", "normal", positive, negative, latent,
                                  disable_pbar=True, seed=0)
    dt = time.perf_counter() - t0
    print(f"  1 euler step (cfg 7, 64x64): {dt:.2f}s  out mean={samples.mean().item():.3f} "
          f"std={samples.std().item():.3f} absmax={samples.abs().max().item():.3f}")
    check(bool(torch.isfinite(samples).all()), "sampled latent finite")
    # A random UNet does not predict the noise, so a 1-step sample is
    # (x - sigma_max * eps_cfg) / 0.18215 (SD15 latent_format.process_out):
    # O(sigma_max * cfg / 0.18215), not a clean latent.  eps itself is O(1).
    check(samples.abs().max().item() < 14.7 * 7.0 * 10, "sampled latent magnitude bounded (< 10 * sigma_max * cfg)")
    s1 = comfy.sample.sample(model, noise, 1, 1.0, "euler", "normal", positive, negative, latent,
                             disable_pbar=True, seed=0)
    print(f"  1 euler step cfg 1: std={s1.std().item():.3f} absmax={s1.abs().max().item():.3f}")
    check(bool(torch.isfinite(s1).all()), "cfg-1 sampled latent finite")
    # eps prediction magnitude at a mid timestep
    with torch.no_grad():
        dm = model.model.diffusion_model
        x = torch.randn(1, in_channels, 8, 8)
        eps = dm(x.to(next(dm.parameters()).dtype), timesteps=torch.tensor([500.0]),
                 context=cond.to(next(dm.parameters()).dtype)).float()
    print(f"  raw UNet eps std={eps.std().item():.3f} absmax={eps.abs().max().item():.3f}")
    check(0.05 < eps.std().item() < 10.0, "UNet output std in (0.05, 10)")
    img = vae.decode(samples)
    print(f"  VAE decode -> {tuple(img.shape)} min={img.min().item():.3f} max={img.max().item():.3f} "
          f"mean={img.mean().item():.3f}")
    check(bool(torch.isfinite(img).all()) and tuple(img.shape) == (1, 64, 64, 3), "decoded image finite, 64x64")
    raw = vae.first_stage_model.decode(samples.to(vae.vae_dtype))
    frac = (raw.abs() <= 1.0).float().mean().item()
    print(f"  raw decode range [{raw.min().item():.3f}, {raw.max().item():.3f}], {frac*100:.1f}% within [-1,1]")


def run_one(tmp: Path, in_channels: int, dtype: torch.dtype) -> None:
    import comfy.sd

    print(f"\n=== in_channels={in_channels} dtype={dtype} ===")
    ckpt = tmp / f"sd15_rand_{in_channels}ch.safetensors"
    t0 = time.perf_counter()
    rm.build_sd15_checkpoint(ckpt, seed=0, in_channels=in_channels, dtype=dtype)
    print(f"  build+write: {time.perf_counter() - t0:.2f}s  size={ckpt.stat().st_size / 2**20:.0f} MiB")

    # determinism
    ckpt2 = tmp / "again.safetensors"
    rm.build_sd15_checkpoint(ckpt2, seed=0, in_channels=in_channels, dtype=dtype)
    check(ckpt.read_bytes() == ckpt2.read_bytes(), "same seed -> byte-identical file")
    ckpt2.unlink()
    # ... and another seed -> other weights in every random tensor (the seed was once silently dropped).
    rm.build_sd15_checkpoint(ckpt2, seed=1, in_channels=in_channels, dtype=dtype)
    from safetensors.torch import load_file
    try:
        assert_models_differ(load_file(str(ckpt)), load_file(str(ckpt2)), every_random_tensor=True)
        check(True, "seed 1 -> different weights in every random tensor")
    except AssertionError as exc:
        check(False, f"seed 1 -> different weights ({exc})")
    ckpt2.unlink()

    t0 = time.perf_counter()
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(ckpt))
    print(f"  comfy load: {time.perf_counter() - t0:.2f}s")
    cfg_name = type(model.model.model_config).__name__
    base_name = type(model.model).__name__
    print(f"  detected model_config={cfg_name} model={base_name} "
          f"unet_config in_channels={model.model.model_config.unet_config['in_channels']}")
    want = "SD15_instructpix2pix" if in_channels == 8 else "SD15"
    check(cfg_name == want, f"detected as {want}")
    print(f"  params: unet={n_params(model.model.diffusion_model)/1e6:.2f}M "
          f"clip={n_params(clip.cond_stage_model)/1e6:.2f}M vae={n_params(vae.first_stage_model)/1e6:.2f}M")
    comfy_one_step(model, clip, vae, in_channels)
    del model, clip, vae

    out = tmp / f"diffusers_{in_channels}ch"
    t0 = time.perf_counter()
    rm.checkpoint_to_diffusers(ckpt, out)
    print(f"  checkpoint_to_diffusers: {time.perf_counter() - t0:.2f}s  -> {sorted(p.name for p in out.iterdir())}")

    t0 = time.perf_counter()
    rep = rm.parity_report(ckpt, out)
    print(f"  parity ({time.perf_counter() - t0:.2f}s):")
    for k, v in rep.items():
        print(f"    {k:20s} max_abs={v['max_abs']:.3e} rel={v['rel']:.3e}")
        check(v["rel"] < 1e-4, f"{k} parity rel < 1e-4")

    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInstructPix2PixPipeline
    from PIL import Image
    import numpy as np

    init = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype("uint8"))
    if in_channels == 4:
        t0 = time.perf_counter()
        pipe = StableDiffusionImg2ImgPipeline.from_pretrained(str(out), local_files_only=True, safety_checker=None)
        pipe.set_progress_bar_config(disable=True)
        res = pipe("a red apple", image=init, num_inference_steps=2, strength=1.0, guidance_scale=7.0,
                   generator=torch.Generator().manual_seed(0), output_type="np")
        arr = res.images[0]
        print(f"  diffusers img2img 2 steps: {time.perf_counter() - t0:.2f}s  out {arr.shape} "
              f"min={arr.min():.3f} max={arr.max():.3f} mean={arr.mean():.3f}")
        check(arr.shape == (64, 64, 3) and bool(np.isfinite(arr).all()), "img2img output finite 64x64")
    else:
        t0 = time.perf_counter()
        pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(
            str(out), local_files_only=True, safety_checker=None)
        pipe.set_progress_bar_config(disable=True)
        res = pipe("make it blue", image=init, num_inference_steps=2, guidance_scale=7.0,
                   image_guidance_scale=1.5, generator=torch.Generator().manual_seed(0), output_type="np")
        arr = res.images[0]
        print(f"  diffusers ip2p 2 steps: {time.perf_counter() - t0:.2f}s  out {arr.shape} "
              f"min={arr.min():.3f} max={arr.max():.3f}")
        check(arr.shape == (64, 64, 3) and bool(np.isfinite(arr).all()), "ip2p output finite 64x64")


def main() -> int:
    comfy_path = os.environ.get("COMFYUI_PATH")
    if not comfy_path:
        print("set COMFYUI_PATH")
        return 2
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    rm.ensure_comfy_importable(comfy_path)
    rm.ensure_comfy_importable(comfy_path)  # idempotent
    quick = "--quick" in sys.argv
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="editlab_rand_") as d:
        tmp = Path(d)
        run_one(tmp, 4, torch.float16)
        if not quick:
            run_one(tmp, 8, torch.float32)
        try:
            rm.build_sd15_checkpoint(tmp / "x.safetensors", tiny_vae=True)
            check(False, "tiny_vae=True should raise")
        except ValueError:
            check(True, "tiny_vae=True raises ValueError")
    print(f"\ntotal {time.perf_counter() - t_all:.1f}s; failures: {len(FAILURES)}")
    for f in FAILURES:
        print("  -", f)
    return 1 if FAILURES else 0


if __name__ == "__main__":
    raise SystemExit(main())
