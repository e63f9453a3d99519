"""Metric nodes (docs/methods.md §9) over the pure ``metrics/`` room.

- ``EditLabEditMetrics``: source + edited (+ edit MASK) (+ target prompt) -> the PIE-Bench set, row by row.
- ``EditLabSubjectMetrics``: generated + reference subject images + prompt -> DINO, CLIP-I, CLIP-T.
- ``EditLabCLIPScore``: CLIP similarity of images to a text or a reference image.
- ``EditLabDirectionalCLIP``: InstructPix2Pix's directional similarity and image similarity.
- ``EditLabMetricPlot``: sweep values -> IMAGE (matplotlib, Agg).

Metric models load from folders under ``models/editlab_metrics/`` (cached per process) and are handed to
ComfyUI's memory management (a ModelPatcher each; on the GPU only while scoring).
"""
from __future__ import annotations

import math
import os

import torch

import comfy.model_management
import comfy.model_patcher
import folder_paths
from comfy_api.latest import io

from ..metrics import edit, embed
from ..metrics import models as mm
from ..metrics.plot import format_points, parse_series, plot_series
from .common import CATEGORY, EditLabError, EditLabNode, check_choice

METRICS_CATEGORY = f"{CATEGORY}/Metrics"
NONE = "(none)"

# models/editlab_metrics/<name>/...; extra_model_paths.yaml entries for "editlab_metrics" are kept.
folder_paths.add_model_folder_path(mm.MODEL_FOLDER, os.path.join(folder_paths.models_dir, mm.MODEL_FOLDER))


def search_dirs() -> list[str]:
    return list(folder_paths.get_folder_paths(mm.MODEL_FOLDER))


def model_choices(kind: str) -> list[str]:
    """Folders whose config.json holds a model of ``kind`` ('clip' or 'vit'), default name first."""
    import json
    names = []
    for base in search_dirs():
        if not os.path.isdir(base):
            continue
        for entry in sorted(os.listdir(base)):
            cfg = os.path.join(base, entry, "config.json")
            try:
                with open(cfg, encoding="utf-8") as fh:
                    if json.load(fh).get("model_type") == kind and entry not in names:
                        names.append(entry)
            except (OSError, ValueError):
                continue
    return names


def folder_choices(kind: str, default: str) -> list[str]:
    # The default name is always offered, so a workflow saved with it validates; loading says where to put it.
    names = model_choices(kind)
    return [default] + [n for n in names if n != default]


_PATCHERS: dict[int, object] = {}


class _Managed(torch.nn.Module):
    """A plain holder: ModelPatcher sets ``.device`` on its model, a read-only property on transformers models."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner


def on_device(module: torch.nn.Module) -> torch.nn.Module:
    """Load a cached metric network through ComfyUI's memory management (one ModelPatcher per network)."""
    patcher = _PATCHERS.get(id(module))
    if patcher is None or patcher.model.inner is not module:
        patcher = comfy.model_patcher.ModelPatcher(_Managed(module), load_device=comfy.model_management.get_torch_device(),
                                                   offload_device=comfy.model_management.unet_offload_device())
        _PATCHERS[id(module)] = patcher
    comfy.model_management.load_models_gpu([patcher])
    return module


def load_clip(name: str) -> mm.ClipModel:
    clip = mm.load_clip(name, search_dirs())
    on_device(clip.model)
    return clip


def load_vit(kind: str, name: str) -> mm.VitModel:
    vit = mm.load_vit(kind, name, search_dirs())
    on_device(vit.model)
    return vit


def _mean(rows: list[dict], key: str) -> float:
    vals = [r[key] for r in rows if key in r and not math.isnan(r[key])]
    return float(sum(vals) / len(vals)) if vals else math.nan


def _rows_report(rows: list[dict], head: str) -> str:
    means = edit.summarize(rows)
    line = head + ", ".join(f"{k}={means[k]:.4g}" for k in rows[0])
    if len(rows) > 1:
        line += " | rows: " + "; ".join(", ".join(f"{v:.4g}" for v in r.values()) for r in rows)
    return line


def clip_input(default_tip: str) -> io.Combo.Input:
    return io.Combo.Input("clip_model", options=folder_choices("clip", mm.DEFAULT_NAMES["clip"]),
                          tooltip=f"{default_tip} A Hugging Face CLIPModel folder under models/editlab_metrics/ "
                                  "(openai/clip-vit-large-patch14 is what PIE-Bench and torchmetrics use).")


class EditMetrics(EditLabNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EditLabEditMetrics",
            display_name="Edit Metrics (PIE-Bench)",
            category=METRICS_CATEGORY,
            description="Scores an edit against its source with PIE-Bench's set (Ju et al.): structure distance "
                        "(DINO ViT-B/8 key self-similarity), background PSNR / LPIPS / MSE / SSIM outside the edit "
                        "mask (the whole image without a mask), CLIP similarity of the whole edited image and of its "
                        "edited region to the target prompt. Batches score row by row; the FLOATs are the means "
                        "(NaN rows left out) and the report lists every row. Local models only.",
            inputs=[
                io.Image.Input("source", tooltip="The original image(s)."),
                io.Image.Input("edited", tooltip="The edited image(s), same size; a batch of one pairs with every row."),
                clip_input("CLIP for the two CLIP similarities."),
                io.Combo.Input("structure_model", options=folder_choices("vit", mm.DEFAULT_NAMES["structure"]),
                               tooltip="DINO ViT-B/8 (facebook/dino-vitb8, Hugging Face ViTModel folder) for the "
                                       "structure distance."),
                io.Combo.Input("lpips_net", options=list(mm.LPIPS_BACKBONES), default="alex",
                               tooltip="LPIPS backbone; its torchvision file must be in models/editlab_metrics/lpips/. "
                                       "PIE-Bench compat always uses squeeze."),
                io.Boolean.Input("pie_bench_compat", default=False,
                                 tooltip="Reproduce the PIE-Bench evaluation's quirks to match published tables "
                                         "(mask border forced to 1, zeroed pixels counted, SqueezeNet LPIPS, DINO on "
                                         "0-255 values, CLIP as max(100 cos, 0)). Off: crop-free region metrics that "
                                         "do not count zeroed pixels, CLIP as a cosine."),
                io.Mask.Input("mask", optional=True, tooltip="The edit region (1 = edited); background metrics use "
                                                             "the rest. Without it they cover the whole image."),
                io.String.Input("target_prompt", default="", multiline=True, optional=True,
                                tooltip="The prompt the edit aimed for (PIE-Bench's brackets are dropped). Empty: the "
                                        "CLIP metrics are left out (NaN)."),
            ],
            outputs=[io.Float.Output(display_name=k, tooltip=f"Mean {k} over the batch.") for k in edit.EDIT_KEYS]
            + [io.String.Output(display_name="report", tooltip="One line: the means and every row.")],
        )

    @classmethod
    def execute(cls, source, edited, clip_model, structure_model, lpips_net, pie_bench_compat, mask=None,
                target_prompt="") -> io.NodeOutput:
        check_choice(lpips_net, mm.LPIPS_BACKBONES, "lpips_net")
        net = "squeeze" if pie_bench_compat else lpips_net
        keys = [k for k in edit.EDIT_KEYS if target_prompt.strip() or not k.startswith("clip")]
        lp = mm.load_lpips(net, search_dirs())
        on_device(lp.module)
        models = edit.EditModels(load_clip(clip_model) if target_prompt.strip() else None,
                                 load_vit("structure", structure_model), lp)
        rows = edit.edit_metrics(source, edited, mask, target_prompt or None, models, compat=pie_bench_compat, keys=keys)
        head = ("PIE-Bench compat: " if pie_bench_compat else "") + f"LPIPS {net}; "
        return io.NodeOutput(*[_mean(rows, k) for k in edit.EDIT_KEYS], _rows_report(rows, head))


class SubjectMetrics(EditLabNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EditLabSubjectMetrics",
            display_name="Subject Metrics (DreamBench)",
            category=METRICS_CATEGORY,
            description="DreamBooth's subject metrics: DINO (ViT-S/16 CLS) and CLIP-I, the mean cosine of each "
                        "generated image to every reference image, and CLIP-T, the cosine of each generated image "
                        "to its prompt. FLOATs are means over the generated batch. A ComfyUI CLIP vision model may "
                        "replace the CLIP folder for CLIP-I (labelled in the report).",
            inputs=[
                io.Image.Input("generated", tooltip="The generated images (a batch)."),
                io.Image.Input("references", tooltip="The real subject images (a batch)."),
                io.String.Input("prompt", default="", multiline=True,
                                tooltip="The prompt the images were generated from (for CLIP-T)."),
                clip_input("CLIP for CLIP-I and CLIP-T."),
                io.Combo.Input("dino_model", options=folder_choices("vit", mm.DEFAULT_NAMES["dino"]),
                               tooltip="DINO ViT-S/16 (facebook/dino-vits16, Hugging Face ViTModel folder)."),
                io.ClipVision.Input("clip_vision", optional=True,
                                    tooltip="Optional: a ComfyUI CLIP vision model (ViT-L/H) for CLIP-I instead of "
                                            "the CLIP folder's image tower."),
            ],
            outputs=[io.Float.Output(display_name="dino", tooltip="Mean DINO similarity."),
                     io.Float.Output(display_name="clip_i", tooltip="Mean CLIP-I."),
                     io.Float.Output(display_name="clip_t", tooltip="Mean CLIP-T."),
                     io.String.Output(display_name="report", tooltip="One line: the means and every row.")],
        )

    @classmethod
    def execute(cls, generated, references, prompt, clip_model, dino_model, clip_vision=None) -> io.NodeOutput:
        if not prompt.strip():
            raise EditLabError("prompt is empty; CLIP-T needs the prompt the images were generated from")
        keys = ("dino", "clip_t") if clip_vision is not None else edit.SUBJECT_KEYS
        rows = edit.subject_metrics(generated, references, prompt, load_clip(clip_model),
                                    load_vit("dino", dino_model), keys=keys)
        head = ""
        if clip_vision is not None:
            g = torch.nn.functional.normalize(clip_vision.encode_image(generated[..., :3])["image_embeds"].float().cpu(), dim=-1)
            r = torch.nn.functional.normalize(clip_vision.encode_image(references[..., :3])["image_embeds"].float().cpu(), dim=-1)
            for row, v in zip(rows, embed.mean_pairwise_cos(g, r).tolist()):
                row["clip_i"] = v
            head = "CLIP-I from the ComfyUI clip_vision model; "
        rows = [{k: r[k] for k in edit.SUBJECT_KEYS} for r in rows]
        return io.NodeOutput(*[_mean(rows, k) for k in edit.SUBJECT_KEYS], _rows_report(rows, head))


class CLIPScore(EditLabNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EditLabCLIPScore",
            display_name="CLIP Score",
            category=METRICS_CATEGORY,
            description="CLIP similarity of each image to a text (CLIP-T) or, when a reference image is connected, "
                        "to the reference images (CLIP-I, mean over references). Outputs the mean cosine and "
                        "torchmetrics' CLIPScore convention max(100 cos, 0).",
            inputs=[
                io.Image.Input("image", tooltip="The image(s) to score."),
                clip_input("CLIP model."),
                io.String.Input("text", default="", multiline=True, tooltip="The text reference (used when no "
                                                                            "reference image is connected)."),
                io.Image.Input("reference_image", optional=True, tooltip="Optional image reference(s): CLIP-I."),
            ],
            outputs=[io.Float.Output(display_name="cosine", tooltip="Mean cosine similarity."),
                     io.Float.Output(display_name="clip_score", tooltip="Mean of max(100 cos, 0) (torchmetrics' CLIPScore)."),
                     io.String.Output(display_name="report", tooltip="Which reference and every row.")],
        )

    @classmethod
    def execute(cls, image, clip_model, text, reference_image=None) -> io.NodeOutput:
        from ..metrics.pixel import as_bchw
        clip = load_clip(clip_model)
        emb = embed.clip_image_embeds(clip, as_bchw(image, "image"))
        if reference_image is not None:
            cos, what = embed.mean_pairwise_cos(emb, embed.clip_image_embeds(clip, as_bchw(reference_image, "reference_image"))), "CLIP-I"
        elif text.strip():
            cos, what = embed.clip_t(emb, embed.clip_text_embeds(clip, [text])), "CLIP-T"
        else:
            raise EditLabError("CLIP Score needs a text or a reference image; both are empty")
        score = (100 * cos).clamp_min(0)
        report = f"{what} ({clip.label}): cosine {cos.mean():.4f}, CLIPScore {score.mean():.2f}; rows: " + \
                 ", ".join(f"{v:.4f}" for v in cos.tolist())
        return io.NodeOutput(float(cos.mean()), float(score.mean()), report)


class DirectionalCLIP(EditLabNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EditLabDirectionalCLIP",
            display_name="Directional CLIP Similarity",
            category=METRICS_CATEGORY,
            description="InstructPix2Pix's evaluation pair: CLIP directional similarity cos(E_I(edited) - "
                        "E_I(source), E_T(caption_after) - E_T(caption_before)) and CLIP image similarity "
                        "cos(E_I(edited), E_I(source)); means over the batch (row by row).",
            inputs=[
                io.Image.Input("source", tooltip="The input image(s)."),
                io.Image.Input("edited", tooltip="The edited image(s); a batch of one pairs with every row."),
                clip_input("CLIP model."),
                io.String.Input("caption_before", default="", multiline=True, tooltip="A caption of the source."),
                io.String.Input("caption_after", default="", multiline=True, tooltip="A caption of the intended edit."),
                io.String.Input("series", default="", optional=True,
                                tooltip="The name of these rows' curve in Metric Plot (e.g. 's_I=1.5'); see 'points'."),
            ],
            outputs=[io.Float.Output(display_name="directional", tooltip="Mean CLIP directional similarity."),
                     io.Float.Output(display_name="image_similarity", tooltip="Mean CLIP image similarity."),
                     io.String.Output(display_name="report", tooltip="Both values and every row."),
                     io.String.Output(display_name="points",
                                      tooltip="'series, image_similarity, directional' per row, for Metric Plot "
                                              "(InstructPix2Pix's Fig. 8 axes).")],
        )

    @classmethod
    def execute(cls, source, edited, clip_model, caption_before, caption_after, series="") -> io.NodeOutput:
        from ..metrics.pixel import as_bchw, pair
        if not caption_before.strip() or not caption_after.strip():
            raise EditLabError("directional similarity needs both captions (before and after the edit)")
        src, out = as_bchw(source, "source"), as_bchw(edited, "edited")
        if src.shape[0] != out.shape[0] and 1 not in (src.shape[0], out.shape[0]):
            raise EditLabError(f"{src.shape[0]} source and {out.shape[0]} edited images; give equal batches (or one source)")
        clip = load_clip(clip_model)
        a, b = pair(embed.clip_image_embeds(clip, src), embed.clip_image_embeds(clip, out))
        t = embed.clip_text_embeds(clip, [caption_before, caption_after])
        d = embed.directional(a, b, t[:1], t[1:])
        s = (a * b).sum(-1)
        report = (f"{clip.label}: directional {d.mean():.4f}, image similarity {s.mean():.4f}; rows: "
                  + "; ".join(f"{x:.4f}/{y:.4f}" for x, y in zip(d.tolist(), s.tolist())))
        points = format_points(series or "edit", s.tolist(), d.tolist())
        return io.NodeOutput(float(d.mean()), float(s.mean()), report, points)


class MetricPlot(EditLabNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EditLabMetricPlot",
            display_name="Metric Plot",
            category=METRICS_CATEGORY,
            description="Draws a sweep's metric values as curves (matplotlib, Agg backend), e.g. InstructPix2Pix's "
                        "CLIP directional similarity against CLIP image similarity over its two scales.",
            inputs=[
                io.String.Input("data", multiline=True, default="s_I=1.2, 0.80, 0.12\ns_I=1.2, 0.75, 0.16",
                                tooltip="One point per line: 'series, x, y' (series groups the points into a "
                                        "curve, in line order)."),
                io.String.Input("x_label", default="CLIP image similarity", tooltip="The x axis label."),
                io.String.Input("y_label", default="CLIP directional similarity", tooltip="The y axis label."),
                io.String.Input("title", default="", tooltip="The plot title (empty: none)."),
                io.Int.Input("width", default=640, min=160, max=4096, tooltip="Image width in px."),
                io.Int.Input("height", default=480, min=120, max=4096, tooltip="Image height in px."),
            ],
            outputs=[io.Image.Output(display_name="image", tooltip="The plot as an IMAGE.")],
        )

    @classmethod
    def execute(cls, data, x_label, y_label, title, width, height) -> io.NodeOutput:
        return io.NodeOutput(plot_series(parse_series(data), x_label, y_label, title, width, height))


NODES = [EditMetrics, SubjectMetrics, CLIPScore, DirectionalCLIP, MetricPlot]
