"""DreamBooth nodes (docs/methods.md §8): a rare identifier, class-prior images from the frozen model, and
fine-tuning with prior preservation on ComfyUI's own weight adapters (LoRA, LoHa, LoKr, OFT).

Training runs on the public pieces: ``comfy.weight_adapter`` adapters attached with
``ModelPatcher.add_weight_wrapper`` to a clone, the model's own ``model_sampling`` for noising and targets,
and ``comfy.samplers.calc_cond_batch`` for the denoised prediction (so model patches keep working). The
outputs are core types: MODEL (adapter applied), LORA_MODEL (core Save LoRA / Load LoRA Model read it),
LOSS_MAP (core Loss Graph draws it).
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from typing import Optional

import safetensors.torch
import torch
import torch.utils.checkpoint

import comfy.model_management
import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import comfy.utils
import folder_paths
from comfy.weight_adapter import adapter_maps
from comfy_api.latest import io

from ..training.dreambooth import INSTANCE, LOSS_TARGETS, DreamBoothConfig, LossHistory, Model, train
from ..training.identifier import check_identifier, pick_identifier
from .clip_tokens import sd_tokenizer, word_tokenizer
from .common import CATEGORY, EditLabError, EditLabNode, Progress, latent_samples, model_sampling, refuse_flow
from .gradients import autograd_weights, with_cross_attn

DB_CATEGORY = f"{CATEGORY}/DreamBooth"
CHECKPOINT_DIR = "editlab_dreambooth"
SEED_MAX = 0xFFFFFFFFFFFFFFFF
log = logging.getLogger("editlab")


# -- Rare Token Identifier ------------------------------------------------------------------------

class RareTokenIdentifier(EditLabNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EditLabRareTokenIdentifier",
            display_name="Rare Token Identifier (DreamBooth)",
            category=DB_CATEGORY,
            description="DreamBooth's [V]: a short word the CLIP tokenizer encodes as one rare token with little "
                        "meaning, deterministic by seed (or your own, checked). Use it as 'a [V] dog'.",
            inputs=[
                io.Clip.Input("clip", tooltip="The CLIP of the checkpoint you will fine-tune (its tokenizer decides "
                                              "what is one token)."),
                io.Int.Input("seed", default=0, min=0, max=SEED_MAX,
                             tooltip="Which rare token to pick; the same seed and CLIP give the same identifier."),
                io.String.Input("identifier", default="",
                                tooltip="Leave empty to pick a rare token; or type your own: it must be one token "
                                        "and not a common word."),
            ],
            outputs=[
                io.String.Output(display_name="identifier", tooltip="The identifier text, e.g. 'vzk'."),
                io.String.Output(display_name="report", tooltip="The identifier's token id(s) and how it was chosen."),
            ],
        )

    @classmethod
    def execute(cls, clip, seed: int, identifier: str) -> io.NodeOutput:
        sd_tok = sd_tokenizer(clip)
        encode = word_tokenizer(sd_tok)
        if identifier.strip():
            ids = check_identifier(identifier, encode)
            text, how = identifier.strip(), "your choice"
        else:
            text, tid = pick_identifier(sd_tok.tokenizer.get_vocab(), encode, seed)
            ids, how = [tid], f"rare token picked with seed {seed}"
        return io.NodeOutput(text, f"{text!r} = token id {ids} ({how})")


# -- Class Prior Images ---------------------------------------------------------------------------

class ClassPriorImages(EditLabNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EditLabClassPriorImages",
            display_name="Class Prior Images (DreamBooth)",
            category=DB_CATEGORY,
            description="Generates DreamBooth's class-prior set with the frozen model from 'a [class]', in chunks, "
                        "with progress and cancel. Image i depends only on (seed, i), so any chunk size gives the "
                        "same set; ComfyUI's cache keeps it across re-queues.",
            inputs=[
                io.Model.Input("model", tooltip="The frozen model (before fine-tuning)."),
                io.Conditioning.Input("positive", tooltip="The class prompt, e.g. 'a dog' (no identifier)."),
                io.Conditioning.Input("negative", tooltip="The negative prompt (usually empty)."),
                io.Int.Input("count", default=100, min=1, max=10000,
                             tooltip="How many class images (the paper: 200-1000; diffusers: 100)."),
                io.Int.Input("width", default=512, min=64, max=8192, step=8, tooltip="Image width in pixels."),
                io.Int.Input("height", default=512, min=64, max=8192, step=8, tooltip="Image height in pixels."),
                io.Int.Input("steps", default=30, min=1, max=1000, tooltip="Sampling steps per image."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, tooltip="CFG scale."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler",
                               tooltip="ComfyUI sampler."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="normal",
                               tooltip="ComfyUI scheduler."),
                io.Int.Input("seed", default=0, min=0, max=SEED_MAX, control_after_generate=True,
                             tooltip="Noise seed of the set."),
                io.Int.Input("chunk_size", default=4, min=1, max=256,
                             tooltip="Images sampled per batch (memory vs speed; does not change the images)."),
            ],
            outputs=[io.Latent.Output(display_name="class_latents", tooltip="The class-prior latents (count rows).")],
        )

    @classmethod
    def execute(cls, model, positive, negative, count: int, width: int, height: int, steps: int, cfg: float,
                sampler_name: str, scheduler: str, seed: int, chunk_size: int) -> io.NodeOutput:
        channels = model.get_model_object("latent_format").latent_channels
        shape = (channels, height // 8, width // 8)
        chunks = []
        progress = Progress(math.ceil(count / chunk_size) * steps)

        def callback(*_args):
            progress.step()

        for start in range(0, count, chunk_size):
            n = min(chunk_size, count - start)
            empty = torch.zeros((n, *shape))
            batch_index = list(range(start, start + n))
            # prepare_noise draws per batch index: image i's noise depends on (seed, i) only.
            noise = comfy.sample.prepare_noise(empty, seed, batch_index)
            out = comfy.sample.sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative, empty,
                                      seed=seed, callback=callback, disable_pbar=True)
            chunks.append(out.cpu())
        return io.NodeOutput({"samples": torch.cat(chunks)})


# -- DreamBooth Train -----------------------------------------------------------------------------

def _cross_attn_rows(cond, n_rows: int, what: str) -> torch.Tensor:
    """A CONDITIONING as one cross-attention tensor per row: one prompt for all, or one per image."""
    if not isinstance(cond, list) or not cond or not torch.is_tensor(cond[0][0]):
        raise EditLabError(f"{what}: expected a CONDITIONING (from CLIP Text Encode)")
    if any(set(extra) - {"pooled_output"} for _, extra in cond):
        raise EditLabError(f"{what}: conditioning with areas, masks, strengths or ControlNets is not supported for "
                           "training; use plain CLIP Text Encode outputs")
    rows = torch.cat([c for c, _ in cond]) if len(cond) > 1 else cond[0][0]
    if rows.shape[0] == 1:
        rows = rows.expand(n_rows, -1, -1)
    if rows.shape[0] != n_rows:
        raise EditLabError(f"{what}: {rows.shape[0]} prompts for {n_rows} images; give one prompt for all images or "
                           "exactly one per image")
    if not torch.isfinite(rows).all():
        raise EditLabError(f"{what}: the conditioning contains NaN or inf")
    return rows


def _pad_tokens(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bring two cross-attention tensors to one token length by repetition (as ComfyUI's cond concat does)."""
    n = math.lcm(a.shape[1], b.shape[1])
    return a.repeat(1, n // a.shape[1], 1), b.repeat(1, n // b.shape[1], 1)


def _attach_adapters(mp, algorithm: str, rank: int, seed: int) -> dict[str, torch.Tensor]:
    """A train adapter on every weight of 2+ dims of the diffusion model; returns the LORA_MODEL dict."""
    lora: dict[str, torch.Tensor] = {}
    adapter_cls = adapter_maps[algorithm]
    # The adapters' own init draws from torch's global generator: fork it so this node neither depends on
    # nor changes anyone else's random state, and the same seed gives the same initial adapters.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, module in mp.model.named_modules():
            weight = getattr(module, "weight", None)
            if not name.startswith("diffusion_model.") or not hasattr(module, "weight_function") \
                    or weight is None or weight.ndim < 2:
                continue
            adapter = adapter_cls.create_train(weight, rank=rank, alpha=1.0).to(torch.float32)
            for pname, param in adapter.named_parameters():
                lora[f"{name}.{pname}"] = param
            mp.add_weight_wrapper(f"{name}.weight", adapter)
    if not lora:
        raise EditLabError("this model has no layers ComfyUI's weight adapters can train")
    return lora


def _gradient_checkpointing(mp) -> None:
    """Recompute the diffusion model's activations in the backward instead of storing them (a wrapper on
    this clone only: no module of the shared model is changed)."""
    def wrapper(executor, *args, **kwargs):
        if not torch.is_grad_enabled():
            return executor(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(lambda *a: executor(*a, **kwargs), *args, use_reentrant=False)

    mp.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "editlab_dreambooth_ckpt", wrapper)


def _checkpoint_path(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_\-]{1,80}", name or ""):
        raise EditLabError(f"checkpoint_name {name!r}: use 1-80 letters, digits, '-' or '_' (it names a file in "
                           f"ComfyUI's output/{CHECKPOINT_DIR}/ folder)")
    folder = os.path.join(folder_paths.get_output_directory(), CHECKPOINT_DIR)
    return os.path.join(folder, f"{name}.safetensors")


def _run_signature(config: DreamBoothConfig, algorithm: str, rank: int, lr: float, n_inst: int, n_cls: int) -> str:
    return json.dumps({"seed": config.seed, "prior_loss_weight": config.prior_loss_weight,
                       "batch_size": config.batch_size, "loss_target": config.loss_target, "algorithm": algorithm,
                       "rank": rank, "learning_rate": lr, "instances": n_inst, "class_images": n_cls},
                      sort_keys=True)


def save_checkpoint(path: str, lora: dict, optimizer: torch.optim.Optimizer, step: int, history: LossHistory,
                    signature: str) -> None:
    """Adapter weights + optimizer state + loss history, written atomically (temp file + rename)."""
    tensors = {f"lora.{k}": v.detach().float().contiguous().cpu() for k, v in lora.items()}
    names = list(lora)
    state = optimizer.state_dict()["state"]
    for i, st in state.items():
        for key, value in st.items():
            tensors[f"optim.{names[i]}.{key}"] = torch.as_tensor(value).float().contiguous().cpu().reshape(-1) \
                if key == "step" else value.detach().contiguous().cpu()
    meta = {"step": str(step), "signature": signature, "history": json.dumps(history.as_loss_map())}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    safetensors.torch.save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, path)


def load_checkpoint(path: str, lora: dict, optimizer: torch.optim.Optimizer, signature: str) -> tuple[int, LossHistory]:
    """Restore a checkpoint saved by the same run settings; returns (step, history)."""
    try:
        with safetensors.safe_open(path, framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise EditLabError(f"{path}: not a readable DreamBooth checkpoint ({exc}); delete it or switch off "
                           "'resume'") from exc
    if meta.get("signature") != signature:
        raise EditLabError(f"{path} was saved by a run with other settings ({meta.get('signature')}); "
                           "use another checkpoint_name or the same settings")
    names = list(lora)
    with torch.no_grad():
        for k, param in lora.items():
            param.copy_(tensors[f"lora.{k}"].to(param))
    state = {}
    for i, name in enumerate(names):
        st = {key.rsplit(".", 1)[1]: v for key, v in tensors.items() if key.startswith(f"optim.{name}.")}
        if st:
            st["step"] = st["step"].reshape(())
            state[i] = st
    sd = optimizer.state_dict()
    sd["state"] = state
    optimizer.load_state_dict(sd)
    history = json.loads(meta.get("history", "{}"))
    return int(meta["step"]), LossHistory(history.get("loss", []), history.get("instance", []), history.get("prior", []))


class _TrainPass(comfy.samplers.Sampler):
    """Runs the DreamBooth loop inside ComfyUI's guider: its processed conds, loaded model and wrappers."""

    def __init__(self, run):
        self.run = run

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        self.run(model_wrap, extra_args["model_options"])
        return latent_image


class DreamBoothTrain(EditLabNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EditLabDreamBoothTrain",
            display_name="DreamBooth Train (prior preservation)",
            category=DB_CATEGORY,
            description="Fine-tunes a weight adapter on 3-5 subject images with DreamBooth's class-specific prior "
                        "preservation loss (Ruiz et al. 2023, Eq. 2): each step draws instance and class rows 1:1 "
                        "into one forward; loss = mean(instance) + lambda * mean(prior). Progress, cancel, periodic "
                        "checkpoints that a later run resumes. The input MODEL is never changed.",
            inputs=[
                io.Model.Input("model", tooltip="The model to fine-tune (SD1.x / SD2.x family)."),
                io.Latent.Input("instance_latents", tooltip="The subject images, VAE-encoded (3-5 in the paper)."),
                io.Conditioning.Input("instance_conditioning",
                                      tooltip="'a [V] [class]' (one for all images, or one per image)."),
                io.Latent.Input("class_latents", optional=True,
                                tooltip="Class-prior images from Class Prior Images (needed when prior_loss_weight > 0)."),
                io.Conditioning.Input("class_conditioning", optional=True, tooltip="'a [class]', without the identifier."),
                io.Float.Input("prior_loss_weight", default=1.0, min=0.0, max=100.0, step=0.05,
                               tooltip="lambda of Eq. 2 (paper: 1). 0 = instance-only fine-tuning (class rows skipped)."),
                io.Int.Input("steps", default=400, min=1, max=100000, tooltip="Optimizer steps."),
                io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1.0, step=1e-6,
                               tooltip="AdamW learning rate (LoRA: ~1e-4; full fine-tuning in the paper: 5e-6)."),
                io.Int.Input("rank", default=8, min=1, max=256, tooltip="Adapter rank."),
                io.Combo.Input("algorithm", options=list(adapter_maps), default=next(iter(adapter_maps)),
                               tooltip="Which of ComfyUI's weight adapters to train."),
                io.Combo.Input("loss_target", options=list(LOSS_TARGETS), default="model",
                               tooltip="model: MSE on the model's own output (eps / v), as the paper and diffusers; "
                                       "x0: MSE on the denoised image, ComfyUI's trainer's weighting."),
                io.Int.Input("batch_size", default=1, min=1, max=64,
                             tooltip="Instance rows per step (and as many class rows)."),
                io.Int.Input("seed", default=0, min=0, max=SEED_MAX,
                             tooltip="Seed of the adapters' initialisation and of every draw (rows, levels, noise)."),
                io.Boolean.Input("gradient_checkpointing", default=True,
                                 tooltip="Recompute activations in the backward: less memory, about one more forward."),
                io.Int.Input("save_every", default=0, min=0, max=100000,
                             tooltip="Write a resumable checkpoint every N steps (0 = never)."),
                io.String.Input("checkpoint_name", default="dreambooth",
                                tooltip=f"File name (letters, digits, - and _) in output/{CHECKPOINT_DIR}/ for "
                                        "periodic checkpoints."),
                io.Boolean.Input("resume", default=False,
                                 tooltip="Continue from the checkpoint of that name if one exists (same settings)."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The model with the trained adapter, ready to sample."),
                io.LoraModel.Output(display_name="lora", tooltip="The adapter weights (core Save LoRA / Load LoRA Model)."),
                io.LossMap.Output(display_name="loss", tooltip="Loss per step: 'loss' (total), 'instance', 'prior'."),
                io.Int.Output(display_name="steps", tooltip="Steps trained."),
            ],
        )

    @classmethod
    def execute(cls, model, instance_latents, instance_conditioning, prior_loss_weight: float, steps: int,
                learning_rate: float, rank: int, algorithm: str, loss_target: str, batch_size: int, seed: int,
                gradient_checkpointing: bool, save_every: int, checkpoint_name: str, resume: bool,
                class_latents: Optional[dict] = None, class_conditioning=None) -> io.NodeOutput:
        config = DreamBoothConfig(steps=steps, prior_loss_weight=prior_loss_weight, batch_size=batch_size, seed=seed,
                                  loss_target=loss_target, save_every=save_every)
        # 1. check everything before any work
        refuse_flow(model, "DreamBooth Train")
        instance = latent_samples(instance_latents, "instance_latents")
        inst_emb = _cross_attn_rows(instance_conditioning, instance.shape[0], "instance_conditioning")
        cls_samples, cls_emb = None, None
        if prior_loss_weight > 0:
            if class_latents is None or class_conditioning is None:
                raise EditLabError("prior_loss_weight > 0 needs class_latents and class_conditioning (Class Prior Images "
                                   "and 'a [class]'); set prior_loss_weight to 0 for instance-only fine-tuning")
            cls_samples = latent_samples(class_latents, "class_latents")
            if cls_samples.shape[1:] != instance.shape[1:]:
                raise EditLabError(f"class images are {tuple(cls_samples.shape[1:])} latents but the subject images "
                                   f"{tuple(instance.shape[1:])}; generate class images at the subject images' size")
            cls_emb = _cross_attn_rows(class_conditioning, 1, "class_conditioning")[:1]
            inst_emb, cls_emb = _pad_tokens(inst_emb, cls_emb)
        path = _checkpoint_path(checkpoint_name) if (save_every or resume) else None
        if algorithm not in adapter_maps:
            raise EditLabError(f"algorithm: {algorithm!r} is not one of {list(adapter_maps)}")

        # 2. a clone with train adapters (the input MODEL keeps its patches, options and weights)
        mp = model.clone()
        with torch.inference_mode(False):
            lora = _attach_adapters(mp, algorithm, rank, seed)
            if gradient_checkpointing:
                _gradient_checkpointing(mp)
            optimizer = torch.optim.AdamW(list(lora.values()), lr=learning_rate)
            signature = _run_signature(config, algorithm, rank, learning_rate, instance.shape[0],
                                       0 if cls_samples is None else cls_samples.shape[0])
            start, history = 0, LossHistory()
            if resume and path and os.path.isfile(path):
                start, history = load_checkpoint(path, lora, optimizer, signature)
                log.info("EditLab DreamBooth: resuming %s at step %d", path, start)

        ms = model_sampling(mp)
        latent_in = mp.get_model_object("process_latent_in")
        progress = comfy.utils.ProgressBar(steps)
        progress.update_absolute(start, steps)

        def run(model_wrap, model_options):
            base = model_wrap.inner_model
            device = comfy.model_management.get_torch_device()
            pos = model_wrap.conds["positive"]

            def predict_x0(x, sigma, rows):
                emb = torch.stack([embs[0][i] if stream == INSTANCE else embs[1][0] for stream, i in rows])
                return comfy.samplers.calc_cond_batch(base, [with_cross_attn(pos, emb.to(x.dtype))], x, sigma,
                                                      model_options)[0]

            def sigma_of(u):
                eps = 1e-4  # keep clear of percent_to_sigma's 0 and "infinite" ends
                return torch.tensor([ms.percent_to_sigma(1.0 - (eps + float(v) * (1 - 2 * eps))) for v in u])

            def c_out(sigma):
                s = sigma.float().cpu()
                one, zero = torch.ones(len(s), 1, 1, 1), torch.zeros(len(s), 1, 1, 1)
                return (ms.calculate_denoised(s, one, zero) - ms.calculate_denoised(s, zero, zero)).flatten().to(sigma.device)

            def on_step(step, total, inst_loss, prior):
                progress.update_absolute(step + 1, steps)
                if (step + 1) % max(1, steps // 10) == 0 or step + 1 == steps:
                    log.info("EditLab DreamBooth step %d/%d: loss %.5f (instance %.5f, prior %.5f)",
                             step + 1, steps, total, inst_loss, prior)

            def on_checkpoint(step, hist):
                save_checkpoint(path, lora, optimizer, step, hist, signature)

            noising = lambda sigma, noise, x0: ms.noise_scaling(sigma, noise, x0, max_denoise=False)  # noqa: E731
            with torch.inference_mode(False), torch.enable_grad(), autograd_weights(base.diffusion_model):
                # tensors made here are ordinary (not inference) tensors, so autograd may save them
                inst = latent_in(instance.float().clone()).to(device)
                cls_x = None if cls_samples is None else latent_in(cls_samples.float().clone()).to(device)
                embs = (inst_emb.clone().to(device), None if cls_emb is None else cls_emb.clone().to(device))
                train(Model(predict_x0, sigma_of, noising, c_out), optimizer, inst, cls_x, config,
                      start_step=start, history=history, device=device, on_step=on_step,
                      on_checkpoint=on_checkpoint if path and save_every else (lambda *a: None),
                      check_cancel=Progress.check_cancel)

        if start < steps:
            guider = comfy.samplers.CFGGuider(mp)
            guider.inner_set_conds({"positive": [[inst_emb[:1].clone(), {}]]})  # one branch, no CFG
            dummy = torch.zeros((1, *instance.shape[1:]))
            guider.sample(dummy, dummy, _TrainPass(run), torch.tensor([1.0, 0.0]), seed=seed)
        with torch.inference_mode(False):
            for param in lora.values():
                param.requires_grad_(False)
        trained = {k: v.detach() for k, v in lora.items()}
        if path and save_every:
            save_checkpoint(path, lora, optimizer, steps, history, signature)
        return io.NodeOutput(mp, trained, history.as_loss_map(), steps)


NODES = [RareTokenIdentifier, ClassPriorImages, DreamBoothTrain]
