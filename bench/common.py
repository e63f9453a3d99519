"""Shared set-up for the benchmarks: ComfyUI in-process, the random SD1.5-architecture weights in both
ComfyUI (single file) and diffusers (folder) layouts, and a median timer.

Every benchmark compares side by side, in one process, on the same weights and inputs.
"""
from __future__ import annotations

import importlib.util
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "support"))


def import_pack():
    if "editlab" not in sys.modules:
        spec = importlib.util.spec_from_file_location("editlab", ROOT / "__init__.py",
                                                      submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["editlab"] = module
        spec.loader.exec_module(module)
    return sys.modules["editlab"]


def _tamed(base: Path, out: Path, scale: float) -> None:
    """A copy of ``base`` whose UNet output convolution is scaled by ``scale``: eps becomes smaller and
    smoother in x, closer to a trained model's (the random UNet's eps is far from smooth)."""
    from safetensors.torch import load_file, save_file
    sd = load_file(str(base))
    for key in ("model.diffusion_model.out.2.weight", "model.diffusion_model.out.2.bias"):
        sd[key] = sd[key] * scale
    tmp = out.with_suffix(".tmp")
    save_file(sd, str(tmp))
    os.replace(tmp, out)


def setup(workdir: str | os.PathLike, *, in_channels: int = 4, diffusers: bool = True,
          eps_scale: float = 1.0) -> dict:
    """Boot ComfyUI, write (once) the random checkpoint and its diffusers twin under ``workdir``
    (``eps_scale`` != 1: the "tamed" variant, see ``_tamed``)."""
    comfy_path = os.environ.get("COMFYUI_PATH")
    if not comfy_path:
        raise SystemExit("set COMFYUI_PATH to a ComfyUI checkout to run the benchmarks")
    import_pack()
    from editlab.headless import runner
    import random_models

    runner.boot(comfy_path)
    import folder_paths

    work = Path(workdir).resolve()
    ckpt_dir = work / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    name = f"editlab_random_sd15_{in_channels}ch.safetensors"
    ckpt = ckpt_dir / name
    if not ckpt.exists():
        random_models.build_sd15_checkpoint(ckpt, seed=0, in_channels=in_channels, dtype=torch.float32)
    if eps_scale != 1.0:
        base, name = ckpt, f"editlab_random_sd15_{in_channels}ch_tame{eps_scale:g}.safetensors"
        ckpt = ckpt_dir / name
        if not ckpt.exists():
            _tamed(base, ckpt, eps_scale)
    folder_paths.add_model_folder_path("checkpoints", str(ckpt_dir), is_default=True)
    out = {"checkpoint": name, "checkpoint_path": ckpt, "runner": runner}
    if diffusers:
        ddir = work / (f"diffusers_{in_channels}ch" + (f"_tame{eps_scale:g}" if eps_scale != 1.0 else ""))
        if not (ddir / "model_index.json").exists():
            random_models.checkpoint_to_diffusers(ckpt, ddir, comfy_path)
        out["diffusers_dir"] = ddir
    return out


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU threads, torch "
            f"{torch.__version__}, {torch.get_num_threads()} intra-op threads, CUDA: {torch.cuda.is_available()}")


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median wall time of each callable, run round-robin so drift hits every contender alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}
