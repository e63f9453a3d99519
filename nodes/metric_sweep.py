"""Set-level metric nodes (docs/methods.md §9).

- ``EditLabSweepMetric``: one metric per image of a sweep, as 'series, x, y' points for Metric Plot. SDEdit's
  realism-faithfulness trade-off over t0 (L2 to the guide, CLIP-T to the prompt), or any other setting swept over
  a batch of images, becomes a curve: Sweep Metric -> (Concatenate several series) -> Metric Plot.
- ``EditLabKID``: Kernel Inception Distance between two image sets (SDEdit's realism measure).
"""
from __future__ import annotations

from comfy_api.latest import io

from ..metrics import models as mm
from ..metrics.plot import format_points, parse_x_values
from ..metrics.sweep import SWEEP_METRICS, SweepModels, sweep_values
from .common import EditLabError, check_choice
from .metrics import METRICS_CATEGORY, EditLabNode, clip_input, folder_choices, load_clip, load_vit, on_device, search_dirs


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
                clip_input("CLIP model (clip_t, clip_i)."),
                io.Combo.Input("dino_model", options=folder_choices("vit", mm.DEFAULT_NAMES["dino"]),
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


class KID(EditLabNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EditLabKID",
            display_name="KID (Kernel Inception Distance)",
            category=METRICS_CATEGORY,
            description="Kernel Inception Distance between a real and a generated image set (SDEdit's realism "
                        "measure): the unbiased polynomial-kernel MMD^2 of Inception-v3 pool features, averaged "
                        "over random subsets (torchmetrics' estimator). Lower = the sets look alike. Needs at least "
                        "2 images per set; meaningful with dozens to thousands.",
            inputs=[
                io.Image.Input("real", tooltip="The reference set (e.g. real photos, or the sources of the edits)."),
                io.Image.Input("generated", tooltip="The set to judge (e.g. the edited / generated images)."),
                io.Int.Input("subsets", default=100, min=1, max=10000, tooltip="Random subsets averaged (torchmetrics: 100)."),
                io.Int.Input("subset_size", default=1000, min=2, max=100000,
                             tooltip="Images per subset, capped at the smaller set (torchmetrics: 1000)."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="Seed of the subset draws."),
            ],
            outputs=[io.Float.Output(display_name="kid", tooltip="Mean KID over the subsets."),
                     io.Float.Output(display_name="kid_std", tooltip="Standard deviation over the subsets."),
                     io.String.Output(display_name="report", tooltip="Both values, the set sizes and the model.")],
        )

    @classmethod
    def execute(cls, real, generated, subsets, subset_size, seed) -> io.NodeOutput:
        from ..metrics import kid
        from ..metrics.pixel import as_bchw
        r, g = as_bchw(real, "real"), as_bchw(generated, "generated")
        if min(r.shape[0], g.shape[0]) < 2:  # before loading Inception
            raise EditLabError(f"KID needs at least 2 images in each set; got {r.shape[0]} real and {g.shape[0]} "
                               "generated (batch the images first)")
        net = mm.load_inception(search_dirs())
        on_device(net.module)
        mean, std = kid.kid(kid.features(net.module, r), kid.features(net.module, g), subsets=subsets,
                            subset_size=subset_size, seed=seed)
        report = f"KID ({net.label}, {r.shape[0]} real vs {g.shape[0]} generated): {mean:.5f} ± {std:.5f}"
        return io.NodeOutput(mean, std, report)


NODES = [SweepMetric, KID]
