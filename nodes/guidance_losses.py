"""The LOSS socket and the nodes that make one (docs/methods.md §10): CLIP Guidance Loss, Classifier Guidance Loss.

A LOSS (``EDITLAB_GUIDANCE_LOSS``) is any object with the shape ``guidance/gradient.py`` documents
(``__call__(inputs, sigma) -> [B]``, ``space``, ``sees``, ``needs_sigma``) plus two optional attributes the
guider uses: ``modules`` (the torch networks it runs, given zero-copy autograd views of their weights while a
gradient is taken) and ``patchers`` (ComfyUI ModelPatchers loaded onto the device before use).
"""
from __future__ import annotations

import os

import torch

import comfy.clip_model
import comfy.model_management
import comfy.model_patcher
import folder_paths
from comfy_api.latest import io

from ..guidance.classifier import load_classifier
from ..guidance.gradient import ClassifierLoss, ClipGuidanceLoss, CutoutConfig
from ..metrics import models as mm
from .common import CATEGORY, EditLabError, EditLabNode
from .metrics import folder_choices, search_dirs

GUIDANCE_CATEGORY = f"{CATEGORY}/Gradient guidance"
LossType = io.Custom("EDITLAB_GUIDANCE_LOSS")
CLASSIFIER_FOLDER = "classifiers"  # ComfyUI registers models/classifiers/ (any extension)
NONE = "(none)"


class _Holder(torch.nn.Module):
    """ModelPatcher sets ``.device`` on its model; a transformers model has that as a read-only property."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner


def managed(module: torch.nn.Module):
    return comfy.model_patcher.ModelPatcher(_Holder(module), load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def differentiable_preprocess(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] -> centre square, resized to ``size`` (bicubic, antialiased), no rounding.

    ComfyUI's ``clip_preprocess`` rounds to 8-bit levels, whose gradient is zero; this keeps the gradient.
    """
    h, w = pixels.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = pixels[:, :, top:top + side, left:left + side]
    return torch.nn.functional.interpolate(square, size=(size, size), mode="bicubic", antialias=side > size,
                                           align_corners=False)


def clip_vision_embeds(net, pixels: torch.Tensor) -> torch.Tensor:
    """The projected image embedding of ComfyUI's CLIPVisionModelProjection, differentiably.

    The same modules and weights as ``net(pixel_values=...)[2]``, but with out-of-place residual additions:
    ComfyUI's CLIP layers add in place (``x += ...``), which autograd refuses to differentiate.
    """
    from comfy.ldm.modules.attention import optimized_attention_for_device
    vision = net.vision_model
    x = vision.pre_layrnorm(vision.embeddings(pixels))
    attention = optimized_attention_for_device(x.device, mask=False, small_input=True)
    for layer in vision.encoder.layers:
        x = x + layer.self_attn(layer.layer_norm1(x), None, attention)
        x = x + layer.mlp(layer.layer_norm2(x))
    return net.visual_projection(vision.post_layernorm(x[:, 0, :]))


def _clip_encoder(clip_model: str, clip_vision):
    """``(encode, size, mean, std, text_encode or None, modules, patchers)`` of the chosen CLIP."""
    if clip_vision is not None and clip_model != NONE:
        raise EditLabError(f"connect either clip_vision or a clip_model folder, not both (clip_model is {clip_model!r}); "
                           f"set clip_model to {NONE} to use the CLIP_VISION input")
    if clip_vision is not None:
        net = getattr(clip_vision, "model", None)
        if not isinstance(net, comfy.clip_model.CLIPVisionModelProjection):
            raise EditLabError(f"clip_vision holds a {type(net).__name__}, not a CLIP image tower; load a CLIP vision "
                               "model (e.g. clip_vision_vit_l / ViT-H) with Load CLIP Vision")
        if getattr(net.vision_model, "output_layernorm", False):
            raise EditLabError("clip_vision holds a SigLIP image tower; CLIP guidance needs a CLIP one (pooled class "
                               "token + projection), e.g. clip_vision_vit_l or ViT-H")
        size = int(clip_vision.image_size)

        def encode(p: torch.Tensor) -> torch.Tensor:
            return clip_vision_embeds(net, p.to(device_of(net)))
        return encode, size, clip_vision.image_mean, clip_vision.image_std, None, [net], [clip_vision.patcher]
    if clip_model == NONE:
        raise EditLabError(f"no CLIP: choose a clip_model folder (a Hugging Face CLIPModel under "
                           f"models/{mm.MODEL_FOLDER}/) or connect a CLIP_VISION model")
    clip = mm.load_clip(clip_model, search_dirs())  # refuses a folder of another model type
    crop = clip.image_cfg.get("crop_size", {})
    size = int(crop.get("height", 224)) if isinstance(crop, dict) else int(crop)

    def encode_hf(p: torch.Tensor) -> torch.Tensor:
        out = clip.model.get_image_features(pixel_values=p.to(device_of(clip.model)))
        # transformers >= 5 returns a model output whose pooler_output is the projected embedding
        return out if isinstance(out, torch.Tensor) else out.pooler_output
    return (encode_hf, size, clip.image_cfg["image_mean"], clip.image_cfg["image_std"], clip.text_features,
            [clip.model], [managed(clip.model)])


def clip_choices() -> list[str]:
    # (none) = the clip_vision input; then the metric nodes' CLIP folders, their default name first
    return [NONE] + folder_choices("clip", mm.DEFAULT_NAMES["clip"])


class ClipGuidanceLossNode(EditLabNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EditLabCLIPGuidanceLoss",
            display_name="CLIP Guidance Loss",
            category=GUIDANCE_CATEGORY,
            description="A LOSS for the Gradient Guider: the spherical distance between CLIP image embeddings of "
                        "random cut-outs of the decoded x0 prediction and a text and/or a reference image (GLIDE's "
                        "CLIP guidance, approximated with an ordinary CLIP on the denoised prediction instead of a "
                        "noise-aware CLIP; docs/methods.md §10). CLIP: a Hugging Face CLIPModel folder under "
                        "models/editlab_metrics/ (text and image), or ComfyUI's CLIP_VISION (image prompts only).",
            inputs=[
                io.Combo.Input("clip_model", options=clip_choices(), default=mm.DEFAULT_NAMES["clip"],
                               tooltip="A Hugging Face CLIPModel folder under models/editlab_metrics/ (the metric "
                                       "nodes' CLIP, openai/clip-vit-large-patch14, or e.g. clip-vit-base-patch32). "
                                       f"{NONE}: use the clip_vision input instead."),
                io.String.Input("text", multiline=True, default="",
                                tooltip="What the image should match (needs a clip_model folder: CLIP_VISION has no "
                                        "text tower). Empty = no text target."),
                io.Float.Input("text_weight", default=1.0, min=0.0, max=100.0, step=0.05,
                               tooltip="Weight of the text target in the loss."),
                io.Float.Input("image_weight", default=1.0, min=0.0, max=100.0, step=0.05,
                               tooltip="Weight of the reference image target in the loss."),
                io.Int.Input("cutouts", default=16, min=0, max=256,
                             tooltip="Random square crops scored per image and step (more = smoother gradient, "
                                     "slower). 0 = the whole image once."),
                io.Float.Input("cut_size_min", default=0.4, min=0.05, max=1.0, step=0.05,
                               tooltip="Smallest cut-out side as a fraction of the image's shorter side."),
                io.Float.Input("cut_size_max", default=1.0, min=0.05, max=1.0, step=0.05,
                               tooltip="Largest cut-out side as a fraction of the image's shorter side."),
                io.Float.Input("augment", default=0.05, min=0.0, max=1.0, step=0.01,
                               tooltip="Augmentation: random flips + pixel noise of this standard deviation on "
                                       "each cut-out (0 = none). Stabilises the gradient."),
                io.Int.Input("seed", default=0, min=0, max=2 ** 31 - 1,
                             tooltip="Seed of the cut-out and augmentation draws (a run is reproducible)."),
                io.ClipVision.Input("clip_vision", optional=True,
                                    tooltip="ComfyUI's CLIP vision model (Load CLIP Vision), used with a differentiable "
                                            f"preprocessing; set clip_model to {NONE}. Image targets only."),
                io.Image.Input("image", optional=True,
                               tooltip="A reference image to steer toward (style / subject image prompt)."),
            ],
            outputs=[LossType.Output(display_name="loss", tooltip="Connect to the Gradient Guider.")],
        )

    @classmethod
    def execute(cls, clip_model, text, text_weight, image_weight, cutouts, cut_size_min, cut_size_max, augment,
                seed, clip_vision=None, image=None) -> io.NodeOutput:
        encode, size, mean, std, text_encode, modules, patchers = _clip_encoder(clip_model, clip_vision)
        cut = CutoutConfig(int(cutouts), float(cut_size_min), float(cut_size_max), float(augment), int(seed))
        comfy.model_management.load_models_gpu(patchers)
        targets, weights = [], []
        mean_t, std_t = torch.tensor(list(mean)).view(1, 3, 1, 1), torch.tensor(list(std)).view(1, 3, 1, 1)
        if text.strip():
            if text_encode is None:
                raise EditLabError("a text target needs a CLIP with a text tower: choose a clip_model folder (Hugging "
                                   "Face CLIPModel), or leave text empty and give a reference image")
            targets.append(text_encode([text]).float().cpu())
            weights.append(float(text_weight))
        if image is not None:
            pixels = differentiable_preprocess(image[..., :3].movedim(-1, 1).float(), size)
            feats = encode((pixels - mean_t) / std_t).float().cpu()
            targets.append(feats.mean(0, keepdim=True))  # a batch of references = their mean embedding
            weights.append(float(image_weight))
        if not targets:
            raise EditLabError("CLIP Guidance Loss has no target: write a text and/or connect a reference image")
        loss = ClipGuidanceLoss(encode, torch.cat(targets), size, mean, std, cut, torch.tensor(weights))
        loss.modules, loss.patchers = modules, patchers
        return io.NodeOutput(loss)


def classifier_files() -> list[str]:
    return [f for f in folder_paths.get_filename_list(CLASSIFIER_FOLDER) if f.lower().endswith(".safetensors")]


class ClassifierGuidanceLossNode(EditLabNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EditLabClassifierGuidanceLoss",
            display_name="Classifier Guidance Loss",
            category=GUIDANCE_CATEGORY,
            description="A LOSS for the Gradient Guider: -log p(y | x, sigma) of a noise-aware classifier "
                        "(classifier guidance, Dhariwal & Nichol 2021; docs/methods.md §10). Files: "
                        "models/classifiers/<name>.safetensors + <name>.json (arch editlab_noisy_convnet, space "
                        "latent|pixel, channels, num_classes, takes_sigma). A latent classifier that takes sigma "
                        "sees the noisy sample, as in the paper; any other sees the (decoded) x0 prediction.",
            inputs=[
                io.Combo.Input("classifier", options=classifier_files(),
                               tooltip="A classifier from models/classifiers/ (safetensors, with its .json config)."),
                io.Int.Input("class_index", default=0, min=0, max=1_000_000,
                             tooltip="The class to steer toward (0-based index into the classifier's classes)."),
            ],
            outputs=[LossType.Output(display_name="loss", tooltip="Connect to the Gradient Guider.")],
        )

    @classmethod
    def execute(cls, classifier, class_index) -> io.NodeOutput:
        path = folder_paths.get_full_path(CLASSIFIER_FOLDER, classifier)
        if path is None or not classifier.lower().endswith(".safetensors"):
            raise EditLabError(f"classifier {classifier!r} is not a .safetensors file in models/{CLASSIFIER_FOLDER}/ "
                               f"(found: {classifier_files() or 'none'})")
        net = load_classifier(os.path.realpath(path))
        cfg = net.cfg
        patcher = managed(net)

        def run(inputs: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            device = device_of(net)
            return net(inputs.to(device, torch.float32), sigma.to(device, torch.float32))

        loss = ClassifierLoss(run, int(class_index), cfg.space, cfg.takes_sigma, cfg.num_classes)
        loss.channels, loss.modules, loss.patchers = cfg.channels, [net], [patcher]
        return io.NodeOutput(loss)
