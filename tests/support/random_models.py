"""Seeded random-weight SD1.5-family checkpoints for offline tests.

This module builds small-but-real Stable Diffusion 1.5 style checkpoints with
seeded random weights, so the test-suite never needs a hub download:

* :func:`build_sd15_checkpoint` writes a single-file ``.safetensors`` checkpoint
  in the original LDM / ComfyUI key layout (``model.diffusion_model.*``,
  ``cond_stage_model.transformer.text_model.*``, ``first_stage_model.*``).
  ComfyUI's stock ``CheckpointLoaderSimple`` /
  ``comfy.sd.load_checkpoint_guess_config`` detects it as ``SD15`` (4 input
  channels) or ``SD15_instructpix2pix`` (8 input channels).
* :func:`checkpoint_to_diffusers` converts such a checkpoint into a diffusers
  folder (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
  ``scheduler/``, ``model_index.json``) holding the very same weights.
* :func:`unet_parity`, :func:`vae_parity`, :func:`text_encoder_parity` and
  :func:`parity_report` compare ComfyUI's and diffusers' forward passes.

Architecture (see ``SD15_REDUCED_UNET_CONFIG``): SD1.5's UNet hyper-parameters
(``model_channels=320``, ``context_dim=768``, ``num_heads=8``,
conv ``proj_in``/``proj_out``) but only two levels (``channel_mult=[1, 2]``),
one res-block per level, one transformer block at every level and in the
middle block (~107M UNet parameters).  The text encoder is the full CLIP-L
text model (ComfyUI uses a fixed config for SD1 CLIP) and the VAE is the full
SD VAE (ComfyUI hard-codes its config, see ``tiny_vae`` below).

ComfyUI is imported lazily: call :func:`ensure_comfy_importable` (the
functions here that need ComfyUI do it for you, using their ``comfyui_path``
argument or the ``COMFYUI_PATH`` environment variable).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Union

import torch

if TYPE_CHECKING:  # pragma: no cover - typing only
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

PathLike = Union[str, "os.PathLike[str]"]

__all__ = [
    "SD15_REDUCED_UNET_CONFIG",
    "SD_VAE_DDCONFIG",
    "ensure_comfy_importable",
    "build_sd15_checkpoint",
    "checkpoint_to_diffusers",
    "diffusers_unet_config",
    "diffusers_vae_config",
    "SCHEDULER_CONFIG",
    "unet_parity",
    "vae_parity",
    "text_encoder_parity",
    "parity_report",
    "weight_seed",
]

# --------------------------------------------------------------------------
# Architecture constants
# --------------------------------------------------------------------------

#: Keyword arguments for ComfyUI's ``openaimodel.UNetModel`` (``in_channels``
#: is filled in per build).  This is exactly what
#: ``comfy.model_detection.detect_unet_config`` + ``supported_models.SD15``'s
#: ``unet_extra_config`` produce for the checkpoints written here.
SD15_REDUCED_UNET_CONFIG: dict[str, Any] = {
    "use_checkpoint": False,
    "image_size": 32,
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "out_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [1, 1],
    "transformer_depth": [1, 1],
    "transformer_depth_output": [1, 1, 1, 1],
    "channel_mult": [1, 2],
    "transformer_depth_middle": 1,
    "use_linear_in_transformer": False,
    "context_dim": 768,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
    "num_heads": 8,
    "num_head_channels": -1,
}

#: ComfyUI's hard-coded SD1.x/SD2.x VAE config (``comfy/sd.py`` ``VAE.__init__``).
SD_VAE_DDCONFIG: dict[str, Any] = {
    "double_z": True,
    "z_channels": 4,
    "resolution": 256,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 128,
    "ch_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_resolutions": [],
    "dropout": 0.0,
}

#: SD1.5's scheduler config (``runwayml/stable-diffusion-v1-5``, PNDM/PLMS).
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "skip_prk_steps": True,
    "set_alpha_to_one": False,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "clip_sample": False,
}

UNET_PREFIX = "model.diffusion_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
VAE_PREFIX = "first_stage_model."

#: Std of bias init (small but non-zero so parity checks exercise biases).
_BIAS_STD = 0.02
_TOKEN_EMBED_STD = 0.02
_POS_EMBED_STD = 0.01

# --------------------------------------------------------------------------
# ComfyUI import helper
# --------------------------------------------------------------------------


def _resolve_comfyui_path(comfyui_path: PathLike | None) -> Path | None:
    if comfyui_path is None:
        env = os.environ.get("COMFYUI_PATH")
        return Path(env).resolve() if env else None
    return Path(comfyui_path).resolve()


def ensure_comfy_importable(comfyui_path: PathLike | None = None) -> None:
    """Make ``import comfy...`` work, forcing ComfyUI into CPU mode.

    Idempotent.  Puts ``comfyui_path`` (default: ``$COMFYUI_PATH``) at the
    front of ``sys.path`` and sets ``comfy.cli_args.args.cpu = True`` before
    ``comfy.model_management`` is first imported (that module reads the flag
    at import time).  If ``comfy.model_management`` was already imported by
    somebody else, the existing configuration is left untouched.

    Args:
        comfyui_path: ComfyUI checkout root; ``None`` uses ``$COMFYUI_PATH``
            or assumes ``comfy`` is already importable.
    """
    path = _resolve_comfyui_path(comfyui_path)
    if path is not None:
        if not (path / "comfy").is_dir():
            raise FileNotFoundError(f"no ComfyUI checkout at {path}")
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    if "comfy.model_management" not in sys.modules:
        import comfy.cli_args

        comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401  (import for side effect)


# --------------------------------------------------------------------------
# Seeded initialisation
# --------------------------------------------------------------------------


def _key_generator(seed: int, key: str) -> torch.Generator:
    """A generator whose state only depends on ``(seed, key)`` (order-free).

    torch's CPU generator (mt19937) keeps only the low 32 bits of its seed, so ``seed`` is mixed into
    those bits: it is the initial value of the key's CRC-32 (for a fixed key, an invertible map of the
    seed, so distinct 32-bit seeds give distinct streams; seed 0 is the plain ``crc32(key)``).  It used
    to be shifted into the high 32 bits, which the generator dropped: every seed gave the same weights.
    """
    seed = int(seed)
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed} (torch's CPU generator keeps 32 bits)")
    return torch.Generator(device="cpu").manual_seed(zlib.crc32(key.encode("utf-8"), seed))


def _randn(shape: torch.Size | tuple[int, ...], std: float, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float32) * std


def _init_module_tensors(
    root: torch.nn.Module,
    prefix: str,
    seed: int,
    dtype: torch.dtype,
    out: dict[str, torch.Tensor],
) -> None:
    """Fill every parameter and buffer of ``root`` (may live on ``meta``).

    Rules, applied per owning module type:

    * ``Linear`` / ``Conv*``: weight ~ N(0, 1/sqrt(fan_in)) (variance
      preserving; GroupNorm/LayerNorm in front of nearly every layer keeps the
      activations O(1)), bias ~ N(0, 0.02).
    * ``GroupNorm`` / ``LayerNorm``: weight = 1, bias = 0.
    * ``Embedding``: N(0, 0.02) (token) / N(0, 0.01) (position).
    * buffers: ``position_ids`` = ``arange``; anything else is an error (so no
      tensor can silently stay uninitialised).
    """
    norm_types = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    conv_types = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    persistent_keys = set(root.state_dict().keys())
    for mod_name, module in root.named_modules():
        mp = f"{mod_name}." if mod_name else ""
        for pname, param in module.named_parameters(recurse=False):
            local = mp + pname
            key = prefix + local
            gen = _key_generator(seed, key)
            shape = param.shape
            if isinstance(module, norm_types):
                value = torch.ones(shape) if pname == "weight" else torch.zeros(shape)
            elif isinstance(module, conv_types):
                if pname == "weight":
                    fan_in = int(math.prod(shape[1:]))
                    value = _randn(shape, 1.0 / math.sqrt(fan_in), gen)
                elif pname == "bias":
                    value = _randn(shape, _BIAS_STD, gen)
                else:
                    raise TypeError(f"unexpected parameter {key}")
            elif isinstance(module, torch.nn.Embedding):
                std = _POS_EMBED_STD if "position" in local else _TOKEN_EMBED_STD
                value = _randn(shape, std, gen)
            else:
                raise TypeError(
                    f"don't know how to initialise {key} of {type(module).__name__}"
                )
            out[key] = value.to(dtype).contiguous()
        for bname, buf in module.named_buffers(recurse=False):
            local = mp + bname
            if local not in persistent_keys:
                continue
            key = prefix + local
            if bname == "position_ids":
                n = buf.shape[-1]
                out[key] = torch.arange(n, dtype=torch.int64).reshape(buf.shape).contiguous()
            else:
                raise TypeError(f"don't know how to initialise buffer {key}")


def _clip_text_config() -> Any:
    """transformers ``CLIPTextConfig`` for CLIP-L (== ComfyUI sd1_clip_config.json)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        projection_dim=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        attention_dropout=0.0,
        dropout=0.0,
        initializer_range=0.02,
        initializer_factor=1.0,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )


def _clip_state_key(key: str) -> str:
    """Normalise a transformers CLIPTextModel key to ``text_model.``-less form.

    transformers 4.x names keys ``text_model.embeddings...``; 5.x drops the
    ``text_model.`` level in ``state_dict()``.
    """
    return key[len("text_model."):] if key.startswith("text_model.") else key


@torch.no_grad()
def _random_sd15_state_dict(seed: int, in_channels: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    import comfy.ops
    from comfy.ldm.models.autoencoder import AutoencoderKL as ComfyAutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from transformers import CLIPTextModel

    out: dict[str, torch.Tensor] = {}

    unet_cfg = dict(SD15_REDUCED_UNET_CONFIG, in_channels=in_channels)
    unet = UNetModel(**unet_cfg, device="meta", operations=comfy.ops.disable_weight_init)
    _init_module_tensors(unet, UNET_PREFIX, seed, dtype, out)
    del unet

    with torch.device("meta"):
        vae = ComfyAutoencoderKL(ddconfig=dict(SD_VAE_DDCONFIG), embed_dim=4)
    _init_module_tensors(vae, VAE_PREFIX, seed, dtype, out)
    del vae

    with torch.device("meta"):
        clip = CLIPTextModel(_clip_text_config())
    clip_sd: dict[str, torch.Tensor] = {}
    _init_module_tensors(clip, "", seed, dtype, clip_sd)
    for k, v in clip_sd.items():
        out[CLIP_PREFIX + _clip_state_key(k)] = v
    # Original SD1.5 checkpoints carry the (int64) position_ids buffer; newer
    # transformers make it non-persistent, so add it explicitly.
    out.setdefault(CLIP_PREFIX + "embeddings.position_ids", torch.arange(77, dtype=torch.int64)[None])
    return out


_ST_DTYPES: dict[torch.dtype, str] = {
    torch.float16: "F16",
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
}


def _atomic_save_safetensors(
    tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]
) -> None:
    """Write a ``.safetensors`` file deterministically and atomically.

    ``safetensors.torch.save_file`` serialises ``__metadata__`` from a Rust
    ``HashMap``, so with more than one metadata entry the header order (and the
    file bytes) change from run to run.  The format is simple (u64-LE header
    length, JSON header, raw little-endian data), so write it here with sorted
    keys, 8-byte aligned header, into a temp file + ``os.replace``.
    """
    if sys.byteorder != "little":  # pragma: no cover
        raise RuntimeError("big-endian hosts are not supported")
    names = sorted(tensors)
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    for name in names:
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        header[name] = {
            "dtype": _ST_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    hbytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hbytes += b" " * ((8 - len(hbytes) % 8) % 8)

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(len(hbytes).to_bytes(8, "little"))
            f.write(hbytes)
            for name in names:
                t = tensors[name].detach().contiguous().cpu()
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


WEIGHT_SEED_ENV = "EDITLAB_WEIGHT_SEED"


def weight_seed(offset: int = 0) -> int:
    """The engine tier's weight seed (``$EDITLAB_WEIGHT_SEED``, default 0), plus ``offset``.

    The session checkpoint uses ``weight_seed()``; a test's "other" model uses ``weight_seed(1)`` (or
    more), so it differs from the session model whatever seed the tier runs on.
    """
    raw = os.environ.get(WEIGHT_SEED_ENV, "0").strip() or "0"
    try:
        seed = int(raw)
    except ValueError:
        raise ValueError(f"{WEIGHT_SEED_ENV} must be an integer, got {raw!r}") from None
    if not 0 <= seed + offset < 2**32:
        raise ValueError(f"{WEIGHT_SEED_ENV}={seed} (+{offset}) is outside [0, 2**32)")
    return seed + offset


def build_sd15_checkpoint(
    path: PathLike,
    seed: int = 0,
    in_channels: int = 4,
    dtype: torch.dtype = torch.float16,
    tiny_vae: bool = False,
    *,
    comfyui_path: PathLike | None = None,
) -> Path:
    """Write a seeded random reduced-SD1.5 checkpoint (LDM single-file layout).

    Args:
        path: destination ``.safetensors`` file (written atomically: temp file
            in the same folder + ``os.replace``).
        seed: weights depend only on ``(seed, key)``.
        in_channels: 4 (text-to-image SD1.5; ComfyUI class ``SD15``) or 8
            (InstructPix2Pix; ComfyUI class ``SD15_instructpix2pix``).
        dtype: ``torch.float16`` or ``torch.float32`` for the stored
            floating-point tensors (``position_ids`` stay int64).
        tiny_vae: not supported: ComfyUI's ``VAE.__init__`` hard-codes the SD
            VAE config (``ch=128, ch_mult=[1,2,4,4], num_res_blocks=2``) for
            any ``decoder.conv_in.weight`` state dict, so a reduced KL VAE does
            not load; the only small VAE it detects is TAESD, a different
            architecture.  Passing ``True`` raises ``ValueError``.
        comfyui_path: ComfyUI root (default ``$COMFYUI_PATH``); ComfyUI's own
            module classes (on the ``meta`` device) provide the key layout.

    Returns:
        The checkpoint path.
    """
    if tiny_vae:
        raise ValueError(
            "tiny_vae is not supported: ComfyUI's VAE loader hard-codes the full SD VAE "
            "config for KL VAEs (comfy/sd.py VAE.__init__), so a reduced VAE would not load"
        )
    if in_channels not in (4, 8):
        raise ValueError(f"in_channels must be 4 or 8, got {in_channels}")
    if dtype not in (torch.float16, torch.float32, torch.bfloat16):
        raise ValueError(f"unsupported dtype {dtype}")
    ensure_comfy_importable(comfyui_path)
    path = Path(path)
    sd = _random_sd15_state_dict(seed, in_channels, dtype)
    metadata = {
        "format": "pt",
        "editlab.random_model": json.dumps(
            {"family": "sd15-reduced", "seed": int(seed), "in_channels": int(in_channels),
             "dtype": str(dtype).replace("torch.", "")}
        ),
    }
    _atomic_save_safetensors(sd, path, metadata)
    return path


# --------------------------------------------------------------------------
# diffusers conversion
# --------------------------------------------------------------------------


def diffusers_unet_config(in_channels: int = 4, sample_size: int = 8) -> dict[str, Any]:
    """``UNet2DConditionModel`` config matching ``SD15_REDUCED_UNET_CONFIG``.

    ``attention_head_dim=8`` is diffusers' legacy SD1.x spelling of
    ``num_heads=8`` (head dim 40 at 320 channels, 80 at 640).
    """
    return {
        "sample_size": sample_size,
        "in_channels": in_channels,
        "out_channels": 4,
        "center_input_sample": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "only_cross_attention": False,
        "block_out_channels": [320, 640],
        "layers_per_block": 1,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "act_fn": "silu",
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "cross_attention_dim": 768,
        "transformer_layers_per_block": 1,
        "attention_head_dim": 8,
        "use_linear_projection": False,
        "upcast_attention": False,
    }


def diffusers_vae_config(sample_size: int = 512) -> dict[str, Any]:
    """``AutoencoderKL`` config of the standard SD VAE."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [128, 256, 512, 512],
        "layers_per_block": 2,
        "act_fn": "silu",
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": sample_size,
        "scaling_factor": 0.18215,
    }


def _load_checkpoint(ckpt_path: PathLike) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(ckpt_path))


def _strict_load(model: torch.nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    expected = set(model.state_dict().keys())
    got = set(sd.keys())
    missing, unexpected = sorted(expected - got), sorted(got - expected)
    if missing or unexpected:
        raise RuntimeError(
            f"{what}: state dict mismatch; missing={missing[:10]} (n={len(missing)}) "
            f"unexpected={unexpected[:10]} (n={len(unexpected)})"
        )
    model.load_state_dict(sd, strict=True)


def _build_diffusers_models(
    ckpt: dict[str, torch.Tensor], sample_size: int
) -> tuple["UNet2DConditionModel", "AutoencoderKL", "CLIPTextModel", int]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )
    from transformers import CLIPTextModel

    in_channels = int(ckpt[UNET_PREFIX + "input_blocks.0.0.weight"].shape[1])

    unet_cfg = diffusers_unet_config(in_channels, sample_size)
    unet = UNet2DConditionModel(**unet_cfg)
    unet_sd = convert_ldm_unet_checkpoint(ckpt, unet_cfg)
    _strict_load(unet, {k: v.float() for k, v in unet_sd.items()}, "unet")

    vae_cfg = diffusers_vae_config(sample_size * 8)
    vae = AutoencoderKL(**vae_cfg)
    vae_sd = convert_ldm_vae_checkpoint(ckpt, vae_cfg)
    _strict_load(vae, {k: v.float() for k, v in vae_sd.items()}, "vae")

    text_encoder = CLIPTextModel(_clip_text_config())
    raw = convert_ldm_clip_checkpoint(
        {k: v for k, v in ckpt.items() if k.startswith("cond_stage_model.")}
    )
    te_keys = set(text_encoder.state_dict().keys())
    te_sd: dict[str, torch.Tensor] = {}
    for k, v in raw.items():
        # raw keys are "text_model.<...>"; adapt to the installed transformers
        cand = k if k in te_keys else _clip_state_key(k)
        if cand.endswith("position_ids") and cand not in te_keys:
            if not torch.equal(v.flatten().long(), torch.arange(v.numel())):
                raise ValueError("checkpoint CLIP position_ids is not arange")
            continue  # non-persistent buffer in this transformers version
        te_sd[cand] = v.float() if v.is_floating_point() else v
    _strict_load(text_encoder, te_sd, "text_encoder")
    return unet, vae, text_encoder, in_channels


def _write_tokenizer(comfy_root: Path, out: Path) -> None:
    """Copy ComfyUI's SD1 tokenizer files, fixing ``model_max_length`` to 77.

    ``comfy/sd1_tokenizer/tokenizer_config.json`` says ``model_max_length:
    8192`` (ComfyUI chunks prompts itself); diffusers pipelines pad to
    ``tokenizer.model_max_length`` and would overflow CLIP's 77 positions.
    """
    src = comfy_root / "comfy" / "sd1_tokenizer"
    out.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json"):
        shutil.copyfile(src / name, out / name)
    cfg = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg["model_max_length"] = 77
    cfg.pop("special_tokens_map_file", None)
    cfg.pop("name_or_path", None)
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")


def _comfy_root() -> Path:
    import comfy.model_management  # ``comfy`` is a namespace package (no __file__)

    return Path(comfy.model_management.__file__).resolve().parent.parent


def checkpoint_to_diffusers(
    ckpt_path: PathLike,
    out_dir: PathLike,
    comfyui_path: PathLike | None = None,
    *,
    sample_size: int = 8,
    torch_dtype: torch.dtype = torch.float32,
) -> Path:
    """Convert a checkpoint from :func:`build_sd15_checkpoint` to diffusers.

    Fully offline: models are built from explicit configs, state dicts are
    converted with ``diffusers.loaders.single_file_utils.convert_ldm_*`` and
    loaded with strict key checking, then ``save_pretrained``.

    The folder loads with ``StableDiffusionPipeline`` /
    ``StableDiffusionImg2ImgPipeline`` (and, for 8 input channels,
    ``StableDiffusionInstructPix2PixPipeline``, which is then also the
    ``_class_name`` in ``model_index.json``).  No safety checker / feature
    extractor.  The folder is assembled next to ``out_dir`` and moved into
    place with ``os.replace``; ``out_dir`` must be absent or empty.

    Args:
        ckpt_path: single-file LDM checkpoint.
        out_dir: destination folder.
        comfyui_path: ComfyUI root (for ``comfy/sd1_tokenizer``); default
            ``$COMFYUI_PATH``.
        sample_size: UNet ``sample_size`` (latent px); pipelines default to
            ``sample_size * 8`` image px, so 8 keeps accidental runs cheap
            (64x64).  Real SD1.5 uses 64.
        torch_dtype: dtype of the saved weights.

    Returns:
        ``out_dir`` as a ``Path``.
    """
    from diffusers import (
        PNDMScheduler,
        StableDiffusionInstructPix2PixPipeline,
        StableDiffusionPipeline,
    )
    from transformers import CLIPTokenizer

    ensure_comfy_importable(comfyui_path)
    comfy_root = _comfy_root()
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty")
    out_dir.parent.mkdir(parents=True, exist_ok=True)

    ckpt = _load_checkpoint(ckpt_path)
    unet, vae, text_encoder, in_channels = _build_diffusers_models(ckpt, sample_size)
    del ckpt

    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=str(out_dir.parent)))
    try:
        _write_tokenizer(comfy_root, tmp / "_tok_src")
        tokenizer = CLIPTokenizer.from_pretrained(str(tmp / "_tok_src"))
        shutil.rmtree(tmp / "_tok_src")
        # from_config keeps "clip_sample" (unknown to PNDM) in the saved config,
        # as in the SD1.5 repo, so DDIMScheduler.from_config(...) gets it.
        scheduler = PNDMScheduler.from_config(dict(SCHEDULER_CONFIG))
        pipe_cls = StableDiffusionInstructPix2PixPipeline if in_channels == 8 else StableDiffusionPipeline
        pipe = pipe_cls(
            vae=vae.to(torch_dtype),
            text_encoder=text_encoder.to(torch_dtype),
            tokenizer=tokenizer,
            unet=unet.to(torch_dtype),
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        # Keep the tokenizer files byte-identical to ComfyUI's (plus the 77 fix).
        _write_tokenizer(comfy_root, tmp / "tokenizer")
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# --------------------------------------------------------------------------
# Parity checks
# --------------------------------------------------------------------------


class _Loaded:
    """ComfyUI + diffusers objects loaded once for a parity run."""

    def __init__(self, ckpt_path: PathLike, diffusers_dir: PathLike, comfyui_path: PathLike | None,
                 parts: tuple[str, ...]) -> None:
        ensure_comfy_importable(comfyui_path)
        import comfy.sd

        self.model_patcher, self.clip, self.comfy_vae, _ = comfy.sd.load_checkpoint_guess_config(
            str(ckpt_path), output_vae="vae" in parts, output_clip="text_encoder" in parts,
            output_model="unet" in parts,
            # On CPU, comfy.model_management.text_encoder_dtype() is float16, which
            # would round fp32 checkpoints' CLIP weights; keep them exact.
            te_model_options={"dtype": torch.float32},
        )
        d = Path(diffusers_dir)
        self.unet = self.vae = self.text_encoder = None
        if "unet" in parts:
            from diffusers import UNet2DConditionModel

            self.unet = UNet2DConditionModel.from_pretrained(str(d / "unet"), local_files_only=True).float().eval()
        if "vae" in parts:
            from diffusers import AutoencoderKL

            self.vae = AutoencoderKL.from_pretrained(str(d / "vae"), local_files_only=True).float().eval()
        if "text_encoder" in parts:
            from transformers import CLIPTextModel

            self.text_encoder = CLIPTextModel.from_pretrained(
                str(d / "text_encoder"), local_files_only=True
            ).float().eval()


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    a = a.detach().float()
    b = b.detach().float()
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}")
    diff = (a - b).abs().max().item()
    scale = max(a.abs().max().item(), 1e-12)
    return diff, diff / scale


@torch.no_grad()
def _unet_diff(ld: _Loaded, seed: int) -> tuple[float, float]:
    assert ld.unet is not None
    dm = ld.model_patcher.model.diffusion_model.float().eval()
    in_ch = int(ld.unet.config.in_channels)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, in_ch, 8, 8, generator=g)
    t = torch.tensor([999.0, 321.0])
    ctx = torch.randn(2, 77, 768, generator=g)
    ref = dm(x, timesteps=t, context=ctx)
    out = ld.unet(x, t, encoder_hidden_states=ctx).sample
    return _max_abs(ref, out)


@torch.no_grad()
def _vae_diff(ld: _Loaded, seed: int) -> dict[str, tuple[float, float]]:
    assert ld.vae is not None
    fsm = ld.comfy_vae.first_stage_model.float().eval()
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(1, 4, 8, 8, generator=g)
    dec = _max_abs(fsm.decode(z), ld.vae.decode(z).sample)
    img = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    enc = _max_abs(fsm.quant_conv(fsm.encoder(img)), ld.vae.quant_conv(ld.vae.encoder(img)))
    return {"vae_decode": dec, "vae_encode_moments": enc}


@torch.no_grad()
def _text_diff(ld: _Loaded, prompt: str) -> tuple[float, float]:
    assert ld.text_encoder is not None
    tokens = ld.clip.tokenize(prompt)
    ids = torch.tensor([[tok for tok, _w in ld.clip.tokenize(prompt)["l"][0]]], dtype=torch.long)
    ref = ld.clip.encode_from_tokens(tokens)  # [1, 77, 768], "last" layer incl. final LN
    out = ld.text_encoder(input_ids=ids).last_hidden_state
    return _max_abs(ref, out)


def unet_parity(ckpt_path: PathLike, diffusers_dir: PathLike, comfyui_path: PathLike | None = None,
                seed: int = 0) -> float:
    """Max abs difference of ComfyUI vs diffusers UNet forward (fp32, CPU).

    Same random latent (8x8, batch 2, both input channel counts supported),
    timesteps (999, 321) and random 77x768 context for both.
    """
    return _unet_diff(_Loaded(ckpt_path, diffusers_dir, comfyui_path, ("unet",)), seed)[0]


def vae_parity(ckpt_path: PathLike, diffusers_dir: PathLike, comfyui_path: PathLike | None = None,
               seed: int = 0) -> float:
    """Max abs difference of the raw (unclamped) VAE decode of an 8x8 latent."""
    return _vae_diff(_Loaded(ckpt_path, diffusers_dir, comfyui_path, ("vae",)), seed)["vae_decode"][0]


def text_encoder_parity(ckpt_path: PathLike, diffusers_dir: PathLike, comfyui_path: PathLike | None = None,
                        prompt: str = "a photo of a cat wearing a hat") -> float:
    """Max abs difference of ComfyUI ``encode_from_tokens`` vs HF ``last_hidden_state``."""
    return _text_diff(_Loaded(ckpt_path, diffusers_dir, comfyui_path, ("text_encoder",)), prompt)[0]


def parity_report(ckpt_path: PathLike, diffusers_dir: PathLike, comfyui_path: PathLike | None = None,
                  seed: int = 0) -> dict[str, dict[str, float]]:
    """All parity numbers with one load: ``{name: {"max_abs": .., "rel": ..}}``.

    ``rel`` is ``max_abs / max|reference|``.
    """
    ld = _Loaded(ckpt_path, diffusers_dir, comfyui_path, ("unet", "vae", "text_encoder"))
    res: dict[str, tuple[float, float]] = {"unet": _unet_diff(ld, seed)}
    res.update(_vae_diff(ld, seed))
    res["text_encoder"] = _text_diff(ld, "a photo of a cat wearing a hat")
    return {k: {"max_abs": v[0], "rel": v[1]} for k, v in res.items()}


def iter_checkpoint_keys(ckpt_path: PathLike) -> Iterator[str]:
    """Keys of a safetensors file without loading tensors (debug helper)."""
    from safetensors import safe_open

    with safe_open(str(ckpt_path), framework="pt") as f:
        yield from f.keys()


# --------------------------------------------------------------------------
# A tiny SDXL-family model, built in memory (too small for the stock loader's
# detection, so the model config is constructed directly, as TESTING.md allows)
# --------------------------------------------------------------------------


def tiny_sdxl_model(seed: int = 0, *, in_channels: int = 4, comfyui_path: PathLike | None = None) -> Any:
    """A ``ModelPatcher`` around a random SDXL-architecture UNet with tiny widths.

    Same family as SDXL for ComfyUI: ``model_base.SDXL`` (eps prediction, SDXL latent format,
    2048-d context, 2816-d ADM input from the pooled text embedding + size conditioning).
    Every parameter is filled from ``seed``. Conditioning for it: ``[[torch.randn(1, 77, 2048),
    {"pooled_output": torch.randn(1, 1280)}]]``. ``in_channels=8`` gives ComfyUI's
    ``SDXL_instructpix2pix`` class (an SDXL-based edit model).
    """
    ensure_comfy_importable(comfyui_path)
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    unet_config = {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": in_channels,
        "model_channels": 64, "num_res_blocks": [1, 1], "transformer_depth": [1, 1], "channel_mult": [1, 2],
        "transformer_depth_middle": 1, "use_linear_in_transformer": True, "context_dim": 2048,
        "num_head_channels": 32, "transformer_depth_output": [1, 1, 1, 1], "use_temporal_resblock": False,
        "use_temporal_attention": False,
    }
    family = comfy.supported_models.SDXL_instructpix2pix if in_channels == 8 else comfy.supported_models.SDXL
    config = family(unet_config)
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.diffusion_model.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.ones_like(p) if name.endswith("norm.weight") or ".norm" in name and name.endswith("weight")
                        else torch.randn(p.shape, generator=gen) * 0.02)
            else:
                fan_in = max(1, p[0].numel())
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device,
                                            offload_device=comfy.model_management.unet_offload_device())


def build_sd15_controlnet(path: PathLike, unet_config: dict, seed: int = 11) -> Path:
    """A random ControlNet for a UNet config (LDM ``control_model.*`` layout, what ControlNetLoader reads)."""
    import comfy.cldm.cldm
    import comfy.ops

    config = dict(unet_config)
    config.pop("out_channels", None)
    config.update(hint_channels=3, operations=comfy.ops.disable_weight_init, device="meta", dtype=torch.float32)
    net = comfy.cldm.cldm.ControlNet(**config)
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, p in net.state_dict().items():
        if p.ndim > 1:
            t = torch.randn(p.shape, generator=gen) / math.sqrt(max(1, p[0].numel()))
        elif "norm" in name and name.endswith("weight"):
            t = torch.ones(p.shape)
        else:
            t = torch.zeros(p.shape)
        sd["control_model." + name] = t.contiguous()
    path = Path(path)
    _atomic_save_safetensors(sd, path, {})
    return path


def write_random_lora(model: Any, path: PathLike, seed: int = 7, rank: int = 4, scale: float = 0.05) -> Path:
    """A random LoRA on every cross-attention projection of ``model`` (a ComfyUI ModelPatcher), in the
    kohya ``lora_unet_*`` layout that core LoraLoaderModelOnly reads; written atomically."""
    import comfy.lora

    keys = comfy.lora.model_lora_keys_unet(model.model, {})
    sd = model.model.state_dict()
    gen = torch.Generator().manual_seed(seed)
    lora = {}
    for name, target in keys.items():
        if name.startswith("lora_unet_") and "attn2_to_" in name and sd[target].ndim == 2:
            out_f, in_f = sd[target].shape
            lora[f"{name}.lora_down.weight"] = torch.randn(rank, in_f, generator=gen) * scale
            lora[f"{name}.lora_up.weight"] = torch.randn(out_f, rank, generator=gen) * scale
            lora[f"{name}.alpha"] = torch.tensor(float(rank))
    if not lora:
        raise ValueError("no cross-attention LoRA keys found")
    path = Path(path)
    _atomic_save_safetensors(lora, path, {})
    return path
