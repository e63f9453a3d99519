"""Inversion suite nodes (METHODS.md §3-4): DDIM Invert, Null-Text Optimize, Inversion Guider,
Save / Load Inversion, Reconstruction PSNR.

Design: inversion and null-text optimisation run *inside* ComfyUI's own guider
(``CFGGuider.sample`` with a custom ``Sampler`` object that walks the schedule upwards, or optimises),
so model loading, conditioning processing, LoRA patches and model wrappers all apply exactly as when
sampling. Gradients for null-text run outside inference mode through zero-copy, non-inference views
of the weights (no second copy, no weight gradients), restored on exit.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import statistics
from typing import Optional

import torch

import comfy.conds
import comfy.model_management
import comfy.samplers
import folder_paths
from comfy_api.latest import io

from ..samplers.inversion import (
    Inversion,
    InversionError,
    NullTextConfig,
    check_schedule,
    ddim_invert,
    landing_denoised,
    optimize_null_text,
    psnr,
)
from .common import CATEGORY, EditLabError, EditLabNode, Progress, latent_samples, to_latent_space, user_error

INVERSION_CATEGORY = f"{CATEGORY}/Inversion"
InversionType = io.Custom("EDITLAB_INVERSION")
INVERSIONS_DIR = "inversions"
MODES = ["null-text", "negative-prompt", "direct", "plain"]
log = logging.getLogger("editlab")


# -- helpers -------------------------------------------------------------------------------------

def model_identity(model) -> str:
    """A short fingerprint of the diffusion model's weights (sampled) and its weight patches (LoRA)."""
    h = hashlib.sha256()
    h.update(type(model.model).__name__.encode())
    h.update(type(model.get_model_object("model_sampling")).__name__.encode())
    params = list(model.model.diffusion_model.named_parameters())
    if params:
        for name, p in (params[0], params[len(params) // 2], params[-1]):
            flat = p.detach().flatten()
            step = max(1, flat.numel() // 512)
            h.update(name.encode() + str(tuple(p.shape)).encode())
            h.update(flat[::step][:512].float().cpu().numpy().tobytes())
    for key in sorted(model.patches):
        h.update(key.encode() + repr([p[0] for p in model.patches[key]]).encode())
    return h.hexdigest()[:16]


def conditioning_tensors(cond: list, what: str) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    if not isinstance(cond, list) or not cond or not torch.is_tensor(cond[0][0]):
        raise EditLabError(f"{what}: expected a CONDITIONING (from CLIP Text Encode)")
    if len(cond) > 1:
        raise EditLabError(f"{what}: combined conditionings ({len(cond)} entries) are not supported for inversion; "
                           "use a single CLIP Text Encode")
    emb, extra = cond[0][0], cond[0][1]
    if not torch.isfinite(emb).all():
        raise EditLabError(f"{what}: the conditioning contains NaN or inf")
    pooled = extra.get("pooled_output")
    return emb, pooled


def source_conditioning(inv: Inversion) -> list:
    extra = {} if inv.source_pooled is None else {"pooled_output": inv.source_pooled}
    return [[inv.source_embedding, extra]]


def with_cross_attn(conds: list[dict], emb: torch.Tensor) -> list[dict]:
    """Processed conds with their cross-attention embedding replaced (keeps pooled/extra conds)."""
    out = []
    for c in conds:
        c = c.copy()
        model_conds = c["model_conds"].copy()
        model_conds["c_crossattn"] = comfy.conds.CONDCrossAttn(emb)
        c["model_conds"] = model_conds
        out.append(c)
    return out


@contextlib.contextmanager
def autograd_weights(module: torch.nn.Module):
    """Make a module usable under autograd although its weights were created in inference mode.

    Each inference-mode parameter/buffer is swapped for a zero-copy alias of the same storage that
    autograd may save (``Tensor.set_`` on the storage), with ``requires_grad=False`` so no weight
    gradient is ever computed; the originals are put back on exit, whatever happens.
    """
    swapped = []
    try:
        with torch.inference_mode(False):
            for mod in module.modules():
                for store in (mod._parameters, mod._buffers):
                    for name, t in list(store.items()):
                        if t is None or not t.is_inference():
                            continue
                        alias = torch.empty(0, dtype=t.dtype, device=t.device)
                        alias.set_(t.untyped_storage(), t.storage_offset(), t.size(), t.stride())
                        store[name] = torch.nn.Parameter(alias, requires_grad=False) if store is mod._parameters else alias
                        swapped.append((store, name, t))
        yield
    finally:
        for store, name, t in reversed(swapped):
            store[name] = t


def _check_model(inv: Inversion, model, strict: bool) -> None:
    current = model_identity(model)
    if inv.model_id and inv.model_id != current:
        msg = (f"this inversion was made with another model (fingerprint {inv.model_id}, this model {current}); "
               "reconstructions will drift. Invert again with this model")
        if strict:
            raise EditLabError(msg + ", or switch off 'check_model' if you mean it (e.g. an added LoRA).")
        log.warning("EditLab: %s.", msg)


# -- samplers that run inside ComfyUI's guider ----------------------------------------------------

class _InversionPass(comfy.samplers.Sampler):
    """Walks the schedule upwards (DDIM inversion) with the guider's CFG-combined prediction."""

    def __init__(self, scaling: str, progress: Progress):
        self.scaling = scaling
        self.progress = progress
        self.trajectory: Optional[torch.Tensor] = None

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None, disable_pbar=False):
        def denoise(x, s):
            return model_wrap(x, s, model_options=extra_args["model_options"], seed=extra_args.get("seed"))

        self.trajectory = ddim_invert(denoise, latent_image.float(), sigmas.float().cpu(), scaling=self.scaling,
                                      on_step=lambda *_: self.progress.step())
        return self.trajectory[0].to(latent_image)


class _NullTextPass(comfy.samplers.Sampler):
    """Runs null-text optimisation with the guider's processed conds and loaded model."""

    def __init__(self, inv: Inversion, config: NullTextConfig, progress: Progress):
        self.inv = inv
        self.config = config
        self.progress = progress
        self.nulls: Optional[torch.Tensor] = None
        self.stats = None

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None, disable_pbar=False):
        model = model_wrap.inner_model
        options = extra_args["model_options"]
        pos, neg = model_wrap.conds["positive"], model_wrap.conds["negative"]
        device = latent_image.device
        null_init = neg[0]["model_conds"]["c_crossattn"].cond

        def eps_of(conds, z, sigma):
            s = z.new_full((z.shape[0],), sigma)
            return (z - comfy.samplers.calc_cond_batch(model, [conds], z, s, options)[0]) / sigma

        def eps_cond(z, sigma):
            return eps_of(pos, z, sigma)

        def eps_uncond(z, sigma, emb):
            return eps_of(with_cross_attn(neg, emb), z, sigma)

        try:
            with torch.inference_mode(False), autograd_weights(model.diffusion_model):
                self.nulls, self.stats = optimize_null_text(
                    eps_cond, eps_uncond, self.inv.trajectory, self.inv.sigmas, null_init, self.config,
                    device=device, check_cancel=Progress.check_cancel, on_step=lambda *_: self.progress.step(),
                    half_precision=compute_dtype(model) == torch.float16)
        except RuntimeError as exc:
            if "Inference tensors cannot be saved for backward" in str(exc):
                raise EditLabError(
                    "null-text optimisation needs gradients through every model in the conditioning; a ControlNet "
                    "or adapter attached to the conditioning cannot provide them. Optimise without it, then add it "
                    "for editing") from exc
            raise
        return latent_image


def compute_dtype(base_model) -> torch.dtype:
    """The dtype a ComfyUI model computes in: its manual-cast dtype if set (weights stored lower), else its own."""
    return getattr(base_model, "manual_cast_dtype", None) or base_model.get_dtype()


# -- the guider ------------------------------------------------------------------------------------

class InversionGuider(comfy.samplers.CFGGuider):
    """Samples from an INVERSION: null-text / negative-prompt / direct / plain CFG replay (rows [source, ...])."""

    def __init__(self, model_patcher, inv: Inversion, mode: str):
        super().__init__(model_patcher)
        self.inversion = inv
        self.mode = mode
        if mode == "null-text" and inv.null_embeddings is None:
            raise EditLabError("mode 'null-text' needs an inversion with null embeddings: run Null-Text Optimize "
                               "on it first (or use 'negative-prompt' / 'direct', which need no optimisation)")

    def set_conds(self, positive, negative):
        conds = {"positive": positive, "negative": negative}
        if self.mode == "negative-prompt":
            conds["source"] = source_conditioning(self.inversion)
        self.inner_set_conds(conds)

    def sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False, seed=None):
        inv = self.inversion
        try:
            inv.check_schedule_matches(sigmas)
        except InversionError as exc:
            raise user_error(exc) from exc
        if tuple(latent_image.shape[1:]) != tuple(inv.trajectory.shape[2:]):
            raise EditLabError(f"the latent {tuple(latent_image.shape)} does not match the inverted image "
                               f"{tuple(inv.trajectory.shape[1:])}; sample from DDIM Invert's noise latent")
        if latent_image.shape[0] < inv.batch:
            raise EditLabError(f"the latent batch ({latent_image.shape[0]}) is smaller than the inversion's "
                               f"({inv.batch}); rows are [source, target, ...]")
        # Moved to the model's device once per run, not once per step.
        device = self.model_patcher.load_device
        self._trajectory = inv.trajectory.to(device)
        self._nulls = None if inv.null_embeddings is None else inv.null_embeddings.to(device)
        return super().sample(noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed)

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        inv = self.inversion
        sigma = float(timestep.flatten()[0])
        try:
            i = inv.step_index(sigma)
        except InversionError as exc:
            raise user_error(exc) from exc
        positive = self.conds.get("positive")
        if self.mode == "null-text":
            negative = with_cross_attn(self.conds["negative"], self._nulls[i].to(x.device))
        elif self.mode == "negative-prompt":
            negative = self.conds["source"]
        else:
            negative = self.conds.get("negative")
        denoised = comfy.samplers.sampling_function(self.inner_model, x, timestep, negative, positive, self.cfg,
                                                    model_options=model_options, seed=seed)
        if self.mode == "direct":
            k = inv.batch
            target = self._trajectory[i + 1].to(x.device, x.dtype)
            denoised = denoised.clone()
            denoised[:k] = landing_denoised(x[:k], target, sigma, float(inv.sigmas[i + 1]))
        return denoised


# -- nodes ---------------------------------------------------------------------------------------

class DDIMInvert(EditLabNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EditLabDDIMInvert",
            display_name="DDIM Invert",
            category=INVERSION_CATEGORY,
            description="DDIM inversion (Song et al. 2021; the pivot of null-text inversion, Mokady et al. 2023): "
                        "runs the sampling schedule backwards from the image latent with the source prompt and "
                        "keeps the whole trajectory (off the GPU). The step evaluates eps on the current latent at "
                        "the next level's timestep, as the reference does. Outputs the INVERSION, the noise latent "
                        "x_T to start editing from (with DisableNoise) and the SIGMAS to sample with.",
            inputs=[
                io.Model.Input("model", tooltip="The model to invert with (edit with the same one)."),
                io.Conditioning.Input("positive", tooltip="The source prompt: a description of the input image."),
                io.Latent.Input("latent", tooltip="The VAE-encoded input image."),
                io.Int.Input("steps", default=50, min=1, max=1000, tooltip="Inversion steps (paper: 50)."),
                io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, default="ddim_uniform",
                               tooltip="ddim_uniform gives the DDIM timesteps (981 ... 1 for 50 steps on SD1.x)."),
                io.Float.Input("guidance", default=1.0, min=0.0, max=30.0, step=0.1,
                               tooltip="CFG scale while inverting; 1 (no guidance) is the reference pivot."),
                io.Combo.Input("input_scaling", options=["reference", "k-space"], default="reference",
                               tooltip="reference: the UNet sees the current latent in its own DDPM scaling at the next "
                                       "timestep (Mokady / PnP next_step). k-space: the k-space latent at the next "
                                       "sigma (exact for a point-mass model, slightly different on real ones)."),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="Unconditional prompt, needed only when guidance != 1."),
                io.Sigmas.Input("sigmas", optional=True,
                                tooltip="A custom schedule (descending, ending at 0); overrides steps and scheduler."),
            ],
            outputs=[
                InversionType.Output(display_name="inversion", tooltip="Trajectory, schedule, source conditioning, model fingerprint."),
                io.Latent.Output(display_name="noise", tooltip="x_T: start sampling here with DisableNoise."),
                io.Sigmas.Output(display_name="sigmas", tooltip="The schedule to sample with (must match)."),
            ],
        )

    @classmethod
    def execute(cls, model, positive, latent, steps, scheduler, guidance, input_scaling, negative=None,
                sigmas=None) -> io.NodeOutput:
        samples = latent_samples(latent, "latent")
        emb, pooled = conditioning_tensors(positive, "positive")
        if emb.shape[0] not in (1, samples.shape[0]):
            raise EditLabError(f"the source conditioning has batch {emb.shape[0]} but the latent has {samples.shape[0]}; "
                               "use one prompt, or one per image")
        if guidance != 1.0 and negative is None:
            raise EditLabError("guidance != 1 needs a negative (unconditional) conditioning: connect one, or set guidance 1")
        if sigmas is None:
            if steps < 1:
                raise EditLabError(f"steps must be at least 1, got {steps}")
            sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps)
            schedule_name = scheduler
        else:
            schedule_name = "custom"
        sigmas = sigmas.float().cpu()
        progress = Progress(len(sigmas) - 1)
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(positive, negative if negative is not None else positive)
        guider.set_cfg(guidance)
        pass_ = _InversionPass(input_scaling, progress)
        try:
            check_schedule(sigmas)
            x_t = guider.sample(torch.zeros_like(samples), samples, pass_, sigmas, disable_pbar=True, seed=0)
        except InversionError as exc:
            raise user_error(exc) from exc
        inv = Inversion(sigmas=sigmas, trajectory=pass_.trajectory, source_embedding=emb.detach().float().cpu(),
                        source_pooled=None if pooled is None else pooled.detach().float().cpu(),
                        model_id=model_identity(model), guidance=float(guidance), scaling=input_scaling,
                        meta={"steps": len(sigmas) - 1, "scheduler": schedule_name})
        out = {"samples": x_t.to(comfy.model_management.intermediate_device()).float()}
        return io.NodeOutput(inv, out, sigmas.clone())


class NullTextOptimize(EditLabNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EditLabNullTextOptimize",
            display_name="Null-Text Optimize",
            category=INVERSION_CATEGORY,
            description="Null-text inversion (Mokady et al., CVPR 2023): optimises one unconditional embedding "
                        "per step so that CFG sampling at 'guidance' retraces the DDIM pivot. Adam in fp32 "
                        "whatever the model's dtype; early stop per step; progress bar per step; cancel works "
                        "at any inner iteration. Sample the result with Inversion Guider in 'null-text' mode.",
            inputs=[
                io.Model.Input("model", tooltip="The model the inversion was made with."),
                InversionType.Input("inversion", tooltip="From DDIM Invert."),
                io.Conditioning.Input("negative", tooltip="The empty-prompt conditioning: the starting null embedding."),
                io.Float.Input("guidance", default=7.5, min=1.0, max=30.0, step=0.1,
                               tooltip="The CFG scale you will edit with (paper: 7.5)."),
                io.Int.Input("inner_steps", default=10, min=0, max=100,
                             tooltip="Adam iterations per step at most (paper: 10)."),
                io.Float.Input("early_stop", default=1e-5, min=0.0, max=1.0, step=1e-6,
                               tooltip="Stop a step's optimisation when the loss < early_stop + i * early_stop_slope (paper: 1e-5)."),
                io.Float.Input("early_stop_slope", default=2e-5, min=0.0, max=1.0, step=1e-6,
                               tooltip="Per-step growth of the early-stop threshold (paper: 2e-5)."),
                io.Float.Input("learning_rate", default=1e-2, min=1e-6, max=1.0, step=1e-4,
                               tooltip="Adam learning rate at step 0, decayed as lr * (1 - i/100) (paper: 1e-2). "
                                       "Faster: 5e-2 with inner_steps 4 matched the paper's reconstruction with "
                                       "40% of the backward passes on the benchmark's weights; check it on yours "
                                       "with Reconstruction PSNR."),
                io.Boolean.Input("check_model", default=True,
                                 tooltip="Refuse an inversion made with another model (weights or LoRA differ)."),
                io.Boolean.Input("secant", default=False, optional=True,
                                 tooltip="EditLab's faster optimiser (off = the paper). Each forward also measures "
                                         "how far the last Adam update should have gone (a secant of the loss's "
                                         "own residual, no extra model pass) and adds the missing or excess part "
                                         "to the next update: a lower loss for the same inner steps. The console "
                                         "line after the run gives the median measured factor: near 1 the "
                                         "learning rate fits this model, 3 or more means it is too small."),
            ],
            outputs=[InversionType.Output(display_name="inversion", tooltip="The inversion with one null embedding per step.")],
        )

    @classmethod
    def execute(cls, model, inversion, negative, guidance, inner_steps, early_stop, early_stop_slope, learning_rate,
                check_model, secant=False) -> io.NodeOutput:
        inv: Inversion = inversion
        _check_model(inv, model, check_model)
        emb, _ = conditioning_tensors(negative, "negative")
        if emb.shape[-1] != inv.source_embedding.shape[-1]:
            raise EditLabError(f"negative embedding width {emb.shape[-1]} does not match the source's "
                               f"{inv.source_embedding.shape[-1]}; encode it with the same CLIP")
        config = NullTextConfig(guidance=guidance, inner_steps=inner_steps, epsilon=early_stop,
                                epsilon_slope=early_stop_slope, lr=learning_rate, secant=bool(secant))
        progress = Progress(inv.steps)
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(source_conditioning(inv), negative)
        guider.set_cfg(guidance)
        pass_ = _NullTextPass(inv, config, progress)
        x_t = inv.noise
        try:
            guider.sample(torch.zeros_like(x_t), torch.zeros_like(x_t), pass_, inv.sigmas, disable_pbar=True, seed=0)
        except InversionError as exc:
            raise user_error(exc) from exc
        stats = pass_.stats
        median = round(statistics.median(stats.secant_factors), 4) if stats.secant_factors else None
        out = inv.with_nulls(pass_.nulls, null_text={
            "guidance": guidance, "forwards": stats.forwards, "backwards": stats.backwards,
            "final_losses": [round(v, 8) for v in stats.losses[-3:]],
            "iterations": list(stats.iterations), "fp16_loss_scale": stats.loss_scale,
            "skipped_updates": stats.skipped_updates, "secant": bool(secant),
            "secant_factor_median": median})
        early = sum(1 for it in stats.iterations if it < inner_steps)
        log.info("EditLab null-text: %d UNet forwards, %d backwards, %d of %d steps stopped early%s.",
                 stats.forwards, stats.backwards, early, len(stats.iterations),
                 f", secant factor median {median}" if secant else "")
        return io.NodeOutput(out)


class InversionGuiderNode(EditLabNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EditLabInversionGuider",
            display_name="Inversion Guider",
            category=INVERSION_CATEGORY,
            description="A GUIDER that edits from an INVERSION with any single-evaluation sampler (euler, ddim). "
                        "Latent rows are [source, target, ...] starting from DDIM Invert's noise. Modes: "
                        "null-text (per-step optimised null embeddings as the unconditional branch, all rows; "
                        "Mokady 2023), negative-prompt (the source prompt as the unconditional branch, no "
                        "optimisation; Miyake 2023), direct (the source row is snapped onto the pivot after every "
                        "step, so it reconstructs exactly; Ju et al. 2024), plain (ordinary CFG: the drift baseline).",
            inputs=[
                io.Model.Input("model", tooltip="The model (may carry a Prompt-to-Prompt attention controller)."),
                InversionType.Input("inversion", tooltip="From DDIM Invert / Null-Text Optimize / Load Inversion."),
                io.Conditioning.Input("positive", tooltip="Prompts per row: [source, target, ...] (or one prompt for all rows)."),
                io.Conditioning.Input("negative", tooltip="Unconditional prompt (null-text mode replaces its embedding per step)."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=30.0, step=0.1, tooltip="Guidance scale (paper: 7.5)."),
                io.Combo.Input("mode", options=MODES, default="null-text",
                               tooltip="How the inversion is honoured while sampling (see the node description)."),
                io.Boolean.Input("check_model", default=True,
                                 tooltip="Refuse an inversion made with another model (weights or LoRA differ)."),
            ],
            outputs=[io.Guider.Output(tooltip="Use with SamplerCustomAdvanced + DisableNoise + DDIM Invert's noise and sigmas.")],
        )

    @classmethod
    def execute(cls, model, inversion, positive, negative, cfg, mode, check_model) -> io.NodeOutput:
        inv: Inversion = inversion
        if mode not in MODES:
            raise EditLabError(f"unknown mode {mode!r}; choose one of {MODES}")
        _check_model(inv, model, check_model)
        guider = InversionGuider(model, inv, mode)
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        return io.NodeOutput(guider)


def _inversion_dirs() -> dict[str, str]:
    return {"input": os.path.join(folder_paths.get_input_directory(), INVERSIONS_DIR),
            "output": os.path.join(folder_paths.get_output_directory(), INVERSIONS_DIR)}


def list_inversions() -> list[str]:
    names = []
    for kind, folder in _inversion_dirs().items():
        if os.path.isdir(folder):
            names += [f"{kind}/{f}" for f in sorted(os.listdir(folder)) if f.endswith(".safetensors")]
    return names


def resolve_inversion(name: str) -> str:
    """The file for a listed name, confined to the two inversions folders."""
    kind, _, fname = name.partition("/")
    folders = _inversion_dirs()
    if kind not in folders or not fname or os.path.basename(fname) != fname:
        raise EditLabError(f"{name!r} is not an inversion file name (expected input/NAME or output/NAME)")
    folder = os.path.realpath(folders[kind])
    path = os.path.realpath(os.path.join(folder, fname))
    if os.path.commonpath([folder, path]) != folder:
        raise EditLabError(f"{name!r} points outside the inversions folder")
    if not os.path.isfile(path):
        raise EditLabError(f"inversion file not found: {path} (searched {', '.join(folders.values())})")
    return path


def sanitize_prefix(prefix: str) -> str:
    clean = re.sub(r"[^A-Za-z0-9._ -]", "_", os.path.basename(prefix.replace("\\", "/"))).strip(" .")
    return clean or "inversion"


def save_inversion(inv: Inversion, prefix: str, extra_meta: dict) -> str:
    from safetensors.torch import save_file

    folder = _inversion_dirs()["output"]
    os.makedirs(folder, exist_ok=True)
    base = sanitize_prefix(prefix)
    existing = {f for f in os.listdir(folder)}
    n = 1
    while f"{base}_{n:05d}.safetensors" in existing:
        n += 1
    name = f"{base}_{n:05d}.safetensors"
    tensors, meta = inv.with_nulls(inv.null_embeddings, **extra_meta).to_state() if extra_meta else inv.to_state()
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, os.path.join(folder, name))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return name


def load_inversion(path: str) -> Inversion:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # safetensors raises its own error types for corrupt/foreign files
        raise EditLabError(f"{os.path.basename(path)} is not a readable safetensors file ({exc}); "
                           "save inversions with EditLab Save Inversion") from exc
    try:
        return Inversion.from_state(tensors, meta)
    except InversionError as exc:
        raise EditLabError(f"{os.path.basename(path)}: {exc}") from exc


class SaveInversion(EditLabNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EditLabSaveInversion",
            display_name="Save Inversion",
            category=INVERSION_CATEGORY,
            description="Saves an INVERSION (trajectory, null embeddings, schedule, source conditioning, model "
                        "fingerprint) as a safetensors file in output/inversions/, atomically. One inversion serves "
                        "many edits: load it with Load Inversion (from output/ or input/inversions).",
            inputs=[
                InversionType.Input("inversion", tooltip="The inversion to save."),
                io.String.Input("filename_prefix", default="inversion",
                                tooltip="File name prefix (letters, digits, . _ - and spaces; folders are not allowed)."),
                io.String.Input("source_prompt", default="", multiline=True,
                                tooltip="The source prompt text, stored in the file's metadata for reference."),
            ],
            outputs=[io.String.Output(display_name="name", tooltip="The saved name, as Load Inversion lists it.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, inversion, filename_prefix, source_prompt) -> io.NodeOutput:
        inv: Inversion = inversion.validate()
        name = save_inversion(inv, filename_prefix, {"source_prompt": source_prompt} if source_prompt else {})
        return io.NodeOutput(f"output/{name}")


class LoadInversion(EditLabNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EditLabLoadInversion",
            display_name="Load Inversion",
            category=INVERSION_CATEGORY,
            description="Loads an INVERSION saved by Save Inversion from input/inversions or output/inversions. "
                        "Connect the model to be warned when the file was made with another one.",
            inputs=[
                io.Combo.Input("inversion", options=list_inversions(),
                               tooltip="output/NAME = saved by this ComfyUI; input/NAME = copied into input/inversions."),
                io.Model.Input("model", tooltip="The model to edit with: scales the noise latent, and a warning is logged "
                                                "when the inversion was made with another model."),
            ],
            outputs=[
                InversionType.Output(display_name="inversion"),
                io.Latent.Output(display_name="noise", tooltip="x_T (latent space) to start sampling from."),
                io.Sigmas.Output(display_name="sigmas", tooltip="The schedule to sample with."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, inversion, model):
        path = resolve_inversion(inversion)
        st = os.stat(path)
        return f"{path}:{st.st_mtime_ns}:{st.st_size}"

    @classmethod
    def validate_inputs(cls, inversion):
        try:
            resolve_inversion(inversion)
        except EditLabError as exc:
            return str(exc)
        return True

    @classmethod
    def execute(cls, inversion, model) -> io.NodeOutput:
        inv = load_inversion(resolve_inversion(inversion))
        _check_model(inv, model, strict=False)
        noise = to_latent_space(model, inv.noise.clone())
        return io.NodeOutput(inv, {"samples": noise}, inv.sigmas.clone())


class ReconstructionPSNR(EditLabNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EditLabReconstructionPSNR",
            display_name="Reconstruction PSNR",
            category=INVERSION_CATEGORY,
            description="How good is an inversion? PSNR (dB) of a reconstruction against the original: images on "
                        "[0, 1] (peak 1), or latents (peak = the original latent's value range). Higher is better; "
                        "'direct' reconstructs to float precision (very high or inf).",
            inputs=[
                io.Image.Input("reconstruction", optional=True, tooltip="Decoded reconstruction."),
                io.Image.Input("original", optional=True, tooltip="The input image."),
                io.Latent.Input("reconstruction_latent", optional=True, tooltip="Reconstructed latent (instead of images)."),
                io.Latent.Input("original_latent", optional=True, tooltip="The original latent."),
                io.Int.Input("row", default=0, min=0, max=63, tooltip="Which batch row of the reconstruction to compare (the source row is 0)."),
            ],
            outputs=[io.Float.Output(display_name="psnr"), io.String.Output(display_name="report")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, row, reconstruction=None, original=None, reconstruction_latent=None, original_latent=None) -> io.NodeOutput:
        if reconstruction is not None and original is not None:
            a, b, what, rng = reconstruction, original, "image", 1.0
        elif reconstruction_latent is not None and original_latent is not None:
            a, b = latent_samples(reconstruction_latent, "reconstruction"), latent_samples(original_latent, "original")
            what, rng = "latent", None
        else:
            raise EditLabError("connect both images (reconstruction + original) or both latents")
        if row >= a.shape[0]:
            raise EditLabError(f"row {row} does not exist (the reconstruction has {a.shape[0]} rows)")
        a = a[row:row + 1]
        b = b[:1] if b.shape[0] != 1 and row >= b.shape[0] else b[min(row, b.shape[0] - 1):][:1]
        try:
            value = psnr(a, b, rng)
        except InversionError as exc:
            raise user_error(exc) from exc
        report = f"{what} PSNR of row {row}: {value:.2f} dB"
        return io.NodeOutput(value if value != float("inf") else 1000.0, report, ui={"text": [report]})


NODES = [DDIMInvert, NullTextOptimize, InversionGuiderNode, SaveInversion, LoadInversion, ReconstructionPSNR]
