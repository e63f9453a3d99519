"""Sweep Metric: one metric per image of a sweep, as 'series, x, y' points for Metric Plot (docs/methods.md §9).

SDEdit's realism-faithfulness trade-off over t0 (L2 to the guide, CLIP-T to the prompt), or any other setting
swept over a batch of images, becomes a curve: Sweep Metric -> (Concatenate several series) -> Metric Plot.
"""
from __future__ import annotations

from comfy_api.latest import io

from ..metrics import models as mm
from ..metrics.plot import format_points, parse_x_values
from ..metrics.sweep import SWEEP_METRICS, SweepModels, sweep_values
from .common import check_choice
from .metrics import METRICS_CATEGORY, EditLabNode, _choices, _clip_input, load_clip, load_vit, on_device, search_dirs


class SweepMetric(EditLabNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EditLabSweepMetric",
            display_name="Sweep Metric",
            category=METRICS_CATEGORY,
            description="Scores every image of a sweep (one image per setting, e.g. SDEdit's t0) with one metric "
                        "against a reference image (l2, mse, psnr, ssim, lpips, clip_i, dino) or a text (clip_t), and "
                        "writes 'series, x, y' points for Metric Plot. Join several series with Concatenate "
                        "(delimiter: a new line).",
            inputs=[
                io.Image.Input("images", tooltip="The sweep: one image per setting, in the order of x_values."),
                io.Combo.Input("metric", options=list(SWEEP_METRICS), default="l2",
                               tooltip="l2: SDEdit's faithfulness (L2 norm of the RGB difference to the reference); "
                                       "mse / psnr / ssim / lpips: pixel metrics to the reference; clip_i / dino: "
                                       "image-embedding cosine to the reference; clip_t: CLIP cosine to the text."),
                io.String.Input("x_values", default="",
                                tooltip="The setting of each image, comma-separated (e.g. '0.3, 0.45, 0.6'); "
                                        "empty = the image index."),
                io.String.Input("series", default="", tooltip="The curve's name in the plot legend (e.g. 'L2 to guide')."),
                _clip_input("CLIP model (clip_t, clip_i)."),
                io.Combo.Input("dino_model", options=_choices("vit", mm.DEFAULT_NAMES["dino"]),
                               tooltip="DINO ViT folder under models/editlab_metrics/ (dino)."),
                io.Combo.Input("lpips_net", options=list(mm.LPIPS_BACKBONES), default="alex",
                               tooltip="LPIPS backbone (lpips)."),
                io.Image.Input("reference", optional=True,
                               tooltip="The reference: the guide / source image (one, or one per sweep image)."),
                io.String.Input("text", default="", multiline=True, optional=True,
                                tooltip="The text for clip_t (usually the prompt)."),
            ],
            outputs=[io.String.Output(display_name="points", tooltip="'series, x, y' lines for Metric Plot."),
                     io.Float.Output(display_name="mean", tooltip="The metric's mean over the sweep."),
                     io.String.Output(display_name="report", tooltip="The metric per setting, one line.")],
        )

    @classmethod
    def execute(cls, images, metric, x_values, series, clip_model, dino_model, lpips_net, reference=None,
                text="") -> io.NodeOutput:
        check_choice(metric, SWEEP_METRICS, "metric")
        xs = parse_x_values(x_values, images.shape[0])  # before any model loads: a typo costs nothing
        models = SweepModels()
        if metric in ("clip_t", "clip_i"):
            models.clip = load_clip(clip_model)
        elif metric == "dino":
            models.dino = load_vit("dino", dino_model)
        elif metric == "lpips":
            check_choice(lpips_net, mm.LPIPS_BACKBONES, "lpips_net")
            models.lpips = mm.load_lpips(lpips_net, search_dirs())
            on_device(models.lpips.module)
        ys = sweep_values(metric, images, reference, text, models).tolist()
        report = f"{metric}: " + ", ".join(f"{x:g} -> {y:.4g}" for x, y in zip(xs, ys))
        return io.NodeOutput(format_points(series or metric, xs, ys), sum(ys) / len(ys), report)


NODES = [SweepMetric]
