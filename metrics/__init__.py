"""EditLab's evaluation metrics (docs/methods.md §9): pure torch, no ComfyUI import.

- ``models``: metric networks from local folders (Hugging Face layout) under ``models/editlab_metrics/``;
  never a hub call; a missing model is an error naming the folder searched and the files expected.
- ``pixel``: PSNR / MSE / SSIM / LPIPS over a region (crop-free, zeroed pixels not counted), L2 to a guide.
- ``embed``: CLIP-T, CLIP-I, CLIP directional similarity, DINO, PIE-Bench structure distance.
- ``kid``: Kernel Inception Distance from any feature extractor (torchmetrics' estimator).
- ``edit``: the PIE-Bench set and the DreamBench subject set, row by row, with ``pie_bench_compat``.
- ``scorer``: ``python -m editlab score`` over existing images (pairs / pie-bench / dreambench layouts).
"""
from __future__ import annotations
