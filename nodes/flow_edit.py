"""FlowEdit Guider + FlowEdit Sampler (Kulikov et al. 2025; docs/methods.md §11): inversion-free editing on
flow-matching models (SD3.x, Flux), as a GUIDER / SAMPLER pair that SamplerCustomAdvanced runs.

The guider carries the two conditions and their guidance scales and gives the sampler the source and
target velocities ``v = (x - D) / sigma`` through ComfyUI's own ``sampling_function`` (model patches,
LoRAs, ControlNets in the conditioning and model wrappers all apply; no forward function is replaced).
The sampler walks ``samplers/flowedit.py`` over the SIGMAS it is given, from the source latent (the
sampler's input latent; the noise input is not used). Guidance-distilled models (Flux-dev) take the two
scales as the guidance *embedding* of each condition, with no unconditional pass, as the authors do.
"""
from __future__ import annotations

import torch

import comfy.model_management
import comfy.samplers
import node_helpers
from comfy_api.latest import io

from ..samplers import family as fam
from ..samplers.flowedit import PRESETS, check_settings, flowedit
from .common import CATEGORY, EditLabError, EditLabNode, model_family, model_sampling, model_type_name

FLOW_CATEGORY = f"{CATEGORY}/Flow"
SD3, FLUX = PRESETS["SD3"], PRESETS["FLUX"]


def require_flow(model, what: str) -> fam.ModelFamily:
    """The model's family, refused (naming the model type) unless it is a flow-matching model."""
    family = model_family(model)
    if not family.flow:
        raise EditLabError(
            f"{what}: the model ({model_type_name(model.model, model_sampling(model))}) is a {family.name} model; "
            f"{what} is a rectified-flow method and needs a flow-matching model (SD3.x, Flux, or a model with a "
            "ModelSamplingSD3 / ModelSamplingFlux patch). For SD1.x / SDXL use SDEdit or DDIM Invert + Inversion Guider")
    return family


class FlowEditGuider(comfy.samplers.CFGGuider):
    """Source and target predictions, each with its own condition and scale (docs/methods.md §11).

    Used by an ordinary sampler it samples the target (``predict_noise``); the FlowEdit Sampler asks it
    for both velocities with :meth:`velocity_pair`.
    """

    def __init__(self, model_patcher, source_scale: float, target_scale: float, distilled: bool):
        super().__init__(model_patcher)
        self.distilled = distilled
        # Distilled: the scales are the guidance embedding (set on the conditions), sampled with CFG 1.
        self.source_cfg = 1.0 if distilled else float(source_scale)
        self.target_cfg = 1.0 if distilled else float(target_scale)
        self.cfg = self.target_cfg

    def set_flow_conds(self, source, target, negative, source_scale: float, target_scale: float) -> None:
        if self.distilled:
            source = node_helpers.conditioning_set_values(source, {"guidance": float(source_scale)})
            target = node_helpers.conditioning_set_values(target, {"guidance": float(target_scale)})
        conds = {"positive": source, "target": target}
        if negative is not None:
            conds["negative"] = negative
        self.inner_set_conds(conds)

    def _denoised(self, which: str, x, sigma: float, model_options, seed):
        timestep = x.new_full((x.shape[0],), sigma)
        cond = self.conds["positive" if which == "source" else "target"]
        cfg = self.source_cfg if which == "source" else self.target_cfg
        return comfy.samplers.sampling_function(self.inner_model, x, timestep, self.conds.get("negative"), cond, cfg,
                                                model_options=model_options, seed=seed)

    def velocity(self, which: str, x, sigma: float, model_options, seed):
        return fam.derivative(x, self._denoised(which, x, sigma, model_options, seed), sigma)

    def velocity_pair(self, z_src, z_tar, sigma: float, model_options, seed):
        return (self.velocity("source", z_src, sigma, model_options, seed),
                self.velocity("target", z_tar, sigma, model_options, seed))

    def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006 (ComfyUI's signature)
        return comfy.samplers.sampling_function(self.inner_model, x, timestep, self.conds.get("negative"),
                                                self.conds["target"], self.target_cfg, model_options=model_options, seed=seed)


class FlowEditSampling(comfy.samplers.Sampler):
    """The SAMPLER object: FlowEdit from the input latent (x_src) over the given sigmas."""

    def __init__(self, n_max: int, n_min: int, n_avg: int, seed: int):
        self.n_max, self.n_min, self.n_avg, self.seed = int(n_max), int(n_min), int(n_avg), int(seed)

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        if not isinstance(model_wrap, FlowEditGuider):
            raise EditLabError(f"FlowEdit Sampler needs the FlowEdit Guider as its guider (got {type(model_wrap).__name__}): "
                               "it asks the guider for the source and the target velocity")
        if latent_image is None or not torch.count_nonzero(latent_image):
            raise EditLabError("FlowEdit Sampler: the latent is empty; connect the VAE-encoded source image as the "
                               "latent (with Disable Noise: FlowEdit draws its own noise from its seed)")
        steps = len(sigmas) - 1
        check_settings(steps, self.n_max, self.n_min, self.n_avg)
        options, seed = extra_args["model_options"], extra_args.get("seed")
        x_src = latent_image.float()
        gen = torch.Generator(device="cpu").manual_seed(self.seed)

        def draw():  # on the CPU, so a seed gives the same edit on every device
            return torch.randn(x_src.shape, generator=gen).to(x_src.device)

        def on_step(i: int, z: torch.Tensor) -> None:
            comfy.model_management.throw_exception_if_processing_interrupted()
            if callback is not None:
                callback(i, z, z, steps)  # z is a clean-latent estimate: the preview shows the edit so far

        out = flowedit(lambda a, b, t: model_wrap.velocity_pair(a, b, t, options, seed),
                       lambda x, t: model_wrap.velocity("target", x, t, options, seed),
                       x_src, sigmas.float().cpu(), self.n_max, self.n_min, self.n_avg, noise=draw, on_step=on_step)
        if denoise_mask is not None:  # a latent noise mask: edit only where it is 1
            out = x_src + denoise_mask.to(out) * (out - x_src)
        return model_wrap.inner_model.model_sampling.inverse_noise_scaling(sigmas[-1], out.to(latent_image.dtype))


class FlowEditGuiderNode(EditLabNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EditLabFlowEditGuider",
            display_name="FlowEdit Guider",
            category=FLOW_CATEGORY,
            description="FlowEdit (Kulikov et al. 2025), the guider half: the source and the target prompt, each "
                        "with its own guidance scale. Use with FlowEdit Sampler in SamplerCustomAdvanced (latent = "
                        "the VAE-encoded source image, noise = Disable Noise, sigmas = BasicScheduler of this "
                        f"model). Authors' settings: SD3 {SD3.source_scale} / {SD3.target_scale} (real CFG, with a "
                        f"negative prompt) over {SD3.steps} steps; Flux-dev {FLUX.source_scale} / {FLUX.target_scale} "
                        f"as the guidance embedding (no CFG pass) over {FLUX.steps} steps; Flux-schnell: both scales 1 "
                        "(no CFG). Flow models only.",
            inputs=[
                io.Model.Input("model", tooltip="An SD3.x or Flux model (flow matching); other models are refused."),
                io.Conditioning.Input("source", tooltip="A description of the source image (the source prompt)."),
                io.Conditioning.Input("target", tooltip="The same description with the edit (the target prompt)."),
                io.Float.Input("source_scale", default=SD3.source_scale, min=0.0, max=100.0, step=0.1,
                               tooltip=f"Guidance of the source prediction. SD3 (CFG): {SD3.source_scale}; Flux-dev "
                                       f"(guidance embedding, replaces FluxGuidance): {FLUX.source_scale}."),
                io.Float.Input("target_scale", default=SD3.target_scale, min=0.0, max=100.0, step=0.1,
                               tooltip=f"Guidance of the target prediction. SD3 (CFG): {SD3.target_scale}; Flux-dev "
                                       f"(guidance embedding): {FLUX.target_scale}. Higher = a stronger edit."),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="The unconditional prompt (empty text) for real CFG (SD3); not used on "
                                              "guidance-distilled Flux-dev or when a scale is 1."),
            ],
            outputs=[io.Guider.Output(tooltip="Connect to SamplerCustomAdvanced together with FlowEdit Sampler.")],
        )

    @classmethod
    def execute(cls, model, source, target, source_scale, target_scale, negative=None) -> io.NodeOutput:
        family = require_flow(model, "FlowEdit")
        distilled = not family.has_uncond
        if not distilled and negative is None and (source_scale != 1.0 or target_scale != 1.0):
            raise EditLabError(
                f"FlowEdit Guider: scales {source_scale} / {target_scale} are CFG scales on this model "
                f"({model_type_name(model.model, model_sampling(model))}) and need a negative (unconditional) "
                "conditioning: connect one (an empty prompt), or set both scales to 1")
        guider = FlowEditGuider(model, source_scale, target_scale, distilled)
        guider.set_flow_conds(source, target, None if distilled else negative, source_scale, target_scale)
        return io.NodeOutput(guider)


class FlowEditSamplerNode(EditLabNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EditLabFlowEditSampler",
            display_name="FlowEdit Sampler",
            category=FLOW_CATEGORY,
            description="FlowEdit (Kulikov et al. 2025), the sampler half: starts at the source latent n_max steps "
                        "before the end of the schedule and moves it by the difference of the target and source "
                        "velocities at noised copies of the source (no inversion). Needs FlowEdit Guider. "
                        f"Authors' settings: SD3 n_max {SD3.n_max} of {SD3.steps} steps; Flux n_max {FLUX.n_max} of "
                        f"{FLUX.steps}; n_min 0, n_avg 1. Nothing changes? Raise n_max (the edit starts at a noisier "
                        "level) or the target scale. Two model passes per step (source and target).",
            inputs=[
                io.Int.Input("n_max", default=SD3.n_max, min=1, max=1000,
                             tooltip=f"How many of the last steps edit (capped at the schedule's steps). The edit "
                                     f"strength: more = larger changes, less kept from the source. SD3: {SD3.n_max} "
                                     f"of {SD3.steps}; Flux: {FLUX.n_max} of {FLUX.steps}."),
                io.Int.Input("n_min", default=0, min=0, max=1000,
                             tooltip="The last n_min steps are ordinary sampling of the target (re-noised once): "
                                     "sharper detail, less faithful. Authors: 0. Must be below n_max."),
                io.Int.Input("n_avg", default=1, min=1, max=64,
                             tooltip="Noise draws averaged per step (each costs two model passes). Authors: 1."),
                io.Int.Input("seed", default=SD3.seed, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of FlowEdit's own noise draws (drawn on the CPU: the same edit on every device)."),
            ],
            outputs=[io.Sampler.Output(tooltip="Connect to SamplerCustomAdvanced with FlowEdit Guider and Disable Noise.")],
        )

    @classmethod
    def execute(cls, n_max, n_min, n_avg, seed) -> io.NodeOutput:
        if n_min >= n_max:
            raise EditLabError(f"n_min ({n_min}) must be below n_max ({n_max}): FlowEdit needs at least one edit step")
        return io.NodeOutput(FlowEditSampling(n_max, n_min, n_avg, seed))


NODES = [FlowEditGuiderNode, FlowEditSamplerNode]
