"""Dataset layouts for the scorer (docs/methods.md §9): each yields rows of paths, prompts and a category.

- ``pairs``: a CSV with columns ``source, edited`` and optional ``prompt`` (the target prompt), ``mask`` (a
  picture, white = edited), ``category``, ``id``; paths relative to the CSV's folder.
- ``pie-bench``: PIE-Bench's ``mapping_file.json`` + ``annotation_images/`` (Ju et al.); the edited images in
  another folder under the same relative paths (``.png`` or the original extension). The category is the
  editing type; the mask is the run-length-encoded 512x512 edit mask of the mapping file.
- ``dreambench``: DreamBench's ``dataset/<subject>/*.jpg`` references and generated images in
  ``<generated>/<subject>/<prompt>/*.png`` (the folder name is the prompt). The category is the subject.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from ..errors import EditLabError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class Row:
    id: str
    category: str
    prompt: str | None
    images: dict = field(default_factory=dict)  # role -> path(s)
    mask: object = None  # a path, an RLE list, or None


def load_image(path: str) -> torch.Tensor:
    """[H,W,3] float in [0,1] (as ComfyUI's LoadImage: 8-bit / 255)."""
    if not os.path.isfile(path):
        raise EditLabError(f"image not found: {path}")
    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0)


def load_mask(mask: object, size: tuple[int, int]) -> torch.Tensor | None:
    """[H,W] in {0,1}: a picture (white = edit) or PIE-Bench's RLE (start, length, ...) over a 512x512 grid."""
    if mask is None or mask == "":
        return None
    if isinstance(mask, list):
        return torch.from_numpy(decode_rle(mask, (512, 512)))
    if not os.path.isfile(str(mask)):
        raise EditLabError(f"mask not found: {mask}")
    with Image.open(str(mask)) as im:
        m = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    if m.shape != size:
        raise EditLabError(f"mask {mask} is {m.shape[1]}x{m.shape[0]} px but its image is {size[1]}x{size[0]}")
    return torch.from_numpy((m > 0.5).astype(np.float32))


def decode_rle(encoded: list, shape: tuple[int, int]) -> np.ndarray:
    """PIE-Bench's mask encoding: (start, length) pairs over the flattened image (no border quirk here)."""
    length = shape[0] * shape[1]
    flat = np.zeros(length, np.float32)
    for start, run in zip(encoded[0::2], encoded[1::2]):
        flat[int(start):int(start) + min(int(run), length - int(start))] = 1
    return flat.reshape(shape)


def pairs_rows(csv_path: str) -> list[Row]:
    if not os.path.isfile(csv_path):
        raise EditLabError(f"pairs CSV not found: {csv_path}")
    base = os.path.dirname(os.path.abspath(csv_path))
    with open(csv_path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = {"source", "edited"} - set(reader.fieldnames or [])
        if missing:
            raise EditLabError(f"{csv_path}: missing column(s) {sorted(missing)}; expected source, edited "
                               "[, prompt, mask, category, id]")
        rows = []
        for i, rec in enumerate(reader):
            def path(key: str) -> str | None:
                v = (rec.get(key) or "").strip()
                return os.path.join(base, v) if v else None
            rows.append(Row(id=(rec.get("id") or "").strip() or str(i), category=(rec.get("category") or "").strip() or "all",
                            prompt=(rec.get("prompt") or "").strip() or None,
                            images={"source": path("source"), "edited": path("edited")}, mask=path("mask")))
    ids = [r.id for r in rows]
    if len(set(ids)) != len(ids):
        raise EditLabError(f"{csv_path}: the id column repeats values; ids must be unique (resume keys on them)")
    return rows


def pie_bench_rows(root: str, edited: str) -> list[Row]:
    mapping = os.path.join(root, "mapping_file.json")
    if not os.path.isfile(mapping):
        raise EditLabError(f"PIE-Bench layout: {mapping} not found (give --data the PIE-Bench folder holding "
                           "mapping_file.json and annotation_images/)")
    with open(mapping, encoding="utf-8") as fh:
        items = json.load(fh)
    rows = []
    for key, item in items.items():
        rel = item["image_path"]
        out = os.path.join(edited, rel)
        if not os.path.isfile(out):
            out = os.path.splitext(out)[0] + ".png"
        rows.append(Row(id=key, category=str(item.get("editing_type_id", "all")),
                        prompt=item.get("editing_prompt"),
                        images={"source": os.path.join(root, "annotation_images", rel), "edited": out},
                        mask=item.get("mask")))
    return rows


def dreambench_rows(dataset: str, generated: str) -> list[Row]:
    if not os.path.isdir(dataset) or not os.path.isdir(generated):
        raise EditLabError(f"DreamBench layout: need --data (dataset/<subject>/*.jpg) and --generated "
                           f"(<subject>/<prompt>/*.png) folders; got {dataset!r} and {generated!r}")
    rows = []
    for subject in sorted(os.listdir(generated)):
        refs = sorted(os.path.join(dataset, subject, f) for f in os.listdir(os.path.join(dataset, subject))
                      if f.lower().endswith(IMAGE_EXTS)) if os.path.isdir(os.path.join(dataset, subject)) else []
        if not refs:
            raise EditLabError(f"DreamBench layout: no reference images for subject {subject!r} in {dataset}")
        for prompt in sorted(os.listdir(os.path.join(generated, subject))):
            folder = os.path.join(generated, subject, prompt)
            for f in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
                if f.lower().endswith(IMAGE_EXTS):
                    rows.append(Row(id=f"{subject}/{prompt}/{f}", category=subject, prompt=prompt,
                                    images={"generated": os.path.join(folder, f), "references": refs}))
    return rows
