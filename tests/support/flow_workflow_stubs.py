"""Test-only stand-ins for the flow workflows' loaders and text encoders (FlowEdit / RF-Inversion examples).

Why the converted API prompt is rewritten, in the test process only (the shipped workflow is never changed):

- a random T5-XXL (ComfyUI's fixed config, 4.7 B parameters) is far too large for the test tier, so every
  ``CLIPTextEncode`` fed by a ``DualCLIPLoader`` / ``TripleCLIPLoader`` becomes a node that returns random
  conditioning of the encoder's real shapes (T5 tokens of width 4096 plus the pooled CLIP output: 2048 for
  SD3, 768 for Flux), seeded by the prompt text, so different prompts differ;
- ComfyUI's Flux detection hard-codes the full-size widths (hidden 3072, 24 heads), so a tiny Flux file
  cannot go through ``UNETLoader``: the loader becomes a node returning ``flow_models.tiny_flux_model``;
  the SD3.5 checkpoint loader likewise returns ``tiny_sd3_model`` (and the VAE below);
- the 16-channel VAE (``VAELoader`` ``ae.safetensors``, the SD3.5 checkpoint's VAE) is ComfyUI's own
  AutoencodingEngine with random weights (its config is fixed, so it is full size: about 84 M parameters).
"""
from __future__ import annotations

import functools
import zlib

import torch

FLOW_CHECKPOINTS = {"sd3.5_medium.safetensors": "sd3"}
FLOW_UNETS = {"flux1-dev.safetensors": "flux-dev"}
FLOW_VAES = {"ae.safetensors"}
CLIP_LOADERS = {"DualCLIPLoader": "flux", "TripleCLIPLoader": "sd3"}
PREFIX = "TestStubFlow"  # not "EditLab...": the validation tests enumerate EditLab* nodes


@functools.lru_cache(maxsize=None)
def _model(kind: str):
    import flow_models as fm
    import random_models
    seed = random_models.weight_seed()
    return fm.tiny_sd3_model(seed) if kind == "sd3" else fm.tiny_flux_model(seed)


@functools.lru_cache(maxsize=None)
def _vae():
    import comfy.ldm.modules.diffusionmodules.model as ae
    import comfy.sd
    import random_models
    ddconfig = dict(random_models.SD_VAE_DDCONFIG, z_channels=16)
    sd: dict[str, torch.Tensor] = {}
    for prefix, cls in (("encoder.", ae.Encoder), ("decoder.", ae.Decoder)):
        with torch.device("meta"):
            module = cls(**ddconfig)
        random_models._init_module_tensors(module, prefix, 5, torch.float32, sd)
    vae = comfy.sd.VAE(sd=sd)
    assert vae.latent_channels == 16, vae.latent_channels
    return vae


class _Stub:
    CATEGORY = "testing"
    FUNCTION = "run"


class FlowCheckpoint(_Stub):
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"kind": (["sd3"],)}}

    def run(self, kind):
        return (_model(kind), None, _vae())


class FlowModel(_Stub):
    RETURN_TYPES = ("MODEL",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"kind": (["flux-dev"],)}}

    def run(self, kind):
        return (_model(kind),)


class FlowVAE(_Stub):
    RETURN_TYPES = ("VAE",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def run(self):
        return (_vae(),)


class FlowClip(_Stub):
    RETURN_TYPES = ("CLIP",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"kind": (["sd3", "flux"],)}}

    def run(self, kind):
        return ({"editlab_test_clip": kind},)


class FlowEncode(_Stub):
    RETURN_TYPES = ("CONDITIONING",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip": ("CLIP",), "text": ("STRING", {"multiline": True})}}

    def run(self, clip, text):
        import flow_models as fm
        seed = zlib.crc32(text.encode("utf-8"))
        if clip["editlab_test_clip"] == "sd3":
            return (fm.sd3_conditioning(seed),)
        return (fm.flux_conditioning(seed, guidance=None),)


STUBS = {f"{PREFIX}Checkpoint": FlowCheckpoint, f"{PREFIX}Model": FlowModel, f"{PREFIX}VAE": FlowVAE,
         f"{PREFIX}Clip": FlowClip, f"{PREFIX}Encode": FlowEncode}


def substitute(prompt: dict) -> dict:
    """The API prompt with the flow loaders and text encoders replaced by the stand-ins (registered here);
    a prompt without them comes back unchanged."""
    import nodes
    out = {k: {**v, "inputs": dict(v["inputs"])} for k, v in prompt.items()}
    clips = set()
    for nid, node in out.items():
        cls, inputs = node["class_type"], node["inputs"]
        if cls == "CheckpointLoaderSimple" and inputs.get("ckpt_name") in FLOW_CHECKPOINTS:
            out[nid] = {"class_type": f"{PREFIX}Checkpoint", "inputs": {"kind": FLOW_CHECKPOINTS[inputs["ckpt_name"]]}}
        elif cls == "UNETLoader" and inputs.get("unet_name") in FLOW_UNETS:
            out[nid] = {"class_type": f"{PREFIX}Model", "inputs": {"kind": FLOW_UNETS[inputs["unet_name"]]}}
        elif cls == "VAELoader" and inputs.get("vae_name") in FLOW_VAES:
            out[nid] = {"class_type": f"{PREFIX}VAE", "inputs": {}}
        elif cls in CLIP_LOADERS:
            out[nid] = {"class_type": f"{PREFIX}Clip", "inputs": {"kind": CLIP_LOADERS[cls]}}
            clips.add(nid)
    for node in out.values():
        link = node["inputs"].get("clip")
        if node["class_type"] == "CLIPTextEncode" and isinstance(link, list) and link[0] in clips:
            node["class_type"] = f"{PREFIX}Encode"
    if out != prompt:
        nodes.NODE_CLASS_MAPPINGS.update(STUBS)
    return out
