"""Metric model names and the metric sets (no torch import: the CLI builds its parser from these)."""
from __future__ import annotations

MODEL_FOLDER = "editlab_metrics"
DEFAULT_NAMES = {"clip": "clip-vit-large-patch14", "dino": "dino-vits16", "structure": "dino-vitb8",
                 "lpips": "lpips", "inception": "inception"}
LPIPS_NETS = ("alex", "squeeze", "vgg")
EDIT_KEYS = ("structure_distance", "psnr", "lpips", "mse", "ssim", "clip_whole", "clip_edited")
SUBJECT_KEYS = ("dino", "clip_i", "clip_t")
GUIDE_KEYS = ("l2",)  # SDEdit's faithfulness to the guide (the source); on request, not in the PIE-Bench set
