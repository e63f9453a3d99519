"""Shared set-up for the benchmarks: ComfyUI in-process, the random SD1.5-architecture weights in both
ComfyUI (single file) and diffusers (folder) layouts (reduced, or full SD1.5 size for the GPU tier), a
median timer and a peak-memory probe.

Every benchmark compares side by side, in one process, on the same weights and inputs.
"""
from __future__ import annotations

import contextlib
import gc
import importlib.util
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

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


#: ComfyUI ``UNetModel`` kwargs of a full-size SD1.5 UNet (860 M parameters): 4 levels (320, 640, 1280,
#: 1280 channels), 2 res-blocks per level, a transformer after each res-block of the first three levels and
#: in the middle, context 768, 8 heads, conv proj_in/proj_out -- what ComfyUI detects for the real v1-5.
SD15_FULL_UNET_CONFIG: dict[str, Any] = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "out_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
    "context_dim": 768, "use_temporal_resblock": False, "use_temporal_attention": False, "num_heads": 8,
    "num_head_channels": -1,
}


_REDUCED_DIFFUSERS_CONFIG: dict[str, Callable[..., dict[str, Any]]] = {}


def diffusers_full_unet_config(in_channels: int = 4, sample_size: int = 64) -> dict[str, Any]:
    """diffusers ``UNet2DConditionModel`` config of ``SD15_FULL_UNET_CONFIG`` (runwayml v1-5's unet/config.json)."""
    import random_models
    cfg = _REDUCED_DIFFUSERS_CONFIG.get("fn", random_models.diffusers_unet_config)(in_channels, sample_size)
    cfg.update({
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
    })
    return cfg


@contextlib.contextmanager
def _full_size_builders() -> Iterator[None]:
    """Let ``tests/support/random_models``' builders write the full-size UNet: they read the UNet config and
    the diffusers config through these two module globals (our own test-support module, not ComfyUI)."""
    import random_models
    saved = random_models.SD15_REDUCED_UNET_CONFIG, random_models.diffusers_unet_config
    _REDUCED_DIFFUSERS_CONFIG.setdefault("fn", saved[1])  # the full config starts from the reduced one
    random_models.SD15_REDUCED_UNET_CONFIG = SD15_FULL_UNET_CONFIG
    random_models.diffusers_unet_config = diffusers_full_unet_config
    try:
        yield
    finally:
        random_models.SD15_REDUCED_UNET_CONFIG, random_models.diffusers_unet_config = saved


def setup(workdir: str | os.PathLike, *, in_channels: int = 4, diffusers: bool = True,
          eps_scale: float = 1.0, full_size: bool = False) -> dict:
    """Boot ComfyUI, write (once) the random checkpoint and its diffusers twin under ``workdir``
    (``eps_scale`` != 1: the "tamed" variant, see ``_tamed``; ``full_size``: a full-size SD1.5 UNet,
    860 M parameters, instead of the reduced 107 M one)."""
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
    size_tag = "full" if full_size else ""
    name = f"editlab_random_sd15{size_tag}_{in_channels}ch.safetensors"
    ckpt = ckpt_dir / name
    if not ckpt.exists():
        with (_full_size_builders() if full_size else contextlib.nullcontext()):
            # full size: stored in fp16 (2 GB, not 4: what ComfyUI computes in on a GPU); the diffusers twin is fp32
            random_models.build_sd15_checkpoint(ckpt, seed=0, in_channels=in_channels,
                                                dtype=torch.float16 if full_size else torch.float32)
    if eps_scale != 1.0:
        base, name = ckpt, f"editlab_random_sd15{size_tag}_{in_channels}ch_tame{eps_scale:g}.safetensors"
        ckpt = ckpt_dir / name
        if not ckpt.exists():
            _tamed(base, ckpt, eps_scale)
    folder_paths.add_model_folder_path("checkpoints", str(ckpt_dir), is_default=True)
    out = {"checkpoint": name, "checkpoint_path": ckpt, "runner": runner}
    if diffusers:
        ddir = work / (f"diffusers{size_tag}_{in_channels}ch" + (f"_tame{eps_scale:g}" if eps_scale != 1.0 else ""))
        if not (ddir / "model_index.json").exists():
            with (_full_size_builders() if full_size else contextlib.nullcontext()):
                random_models.checkpoint_to_diffusers(ckpt, ddir, comfy_path, sample_size=64 if full_size else 8)
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


def run_with_peak(fn: Callable[[], Any]) -> tuple[Any, float]:
    """Run ``fn`` once; return its result and the MiB of memory above the starting point at its peak.

    CUDA: ``torch.cuda.max_memory_allocated`` over ``memory_allocated`` before the run (models already
    resident are the baseline, models loaded by ``fn`` count). CPU (Linux): rise of the peak resident set
    (``VmHWM``, reset through ``/proc/self/clear_refs``) over the resident set before -- as ``bench_p2p.py``.
    """
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        return out, (torch.cuda.max_memory_allocated() - base) / 2**20
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    base = _status_kib("VmRSS")
    out = fn()
    return out, (_status_kib("VmHWM") - base) / 1024


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def free_models() -> None:
    """Unload every model ComfyUI holds and release cached device memory (between benchmarks)."""
    import comfy.model_management as mm
    mm.unload_all_models()
    gc.collect()
    mm.soft_empty_cache()
