"""``python -m editlab score``: score images that already exist, at dataset scale (docs/methods.md §9).

    python -m editlab score --layout pairs --data pairs.csv --out results/ [--models DIR] [--batch 16]
    python -m editlab score --layout pie-bench --data PIE-Bench_v1/ --edited OUTPUTS/ --out results/ --pie-bench-compat
    python -m editlab score --layout dreambench --data dreambench/dataset --generated GEN/ --out results/

Rows are scored in fixed blocks of ``--batch`` (models run once per block, not once per image); each finished
block is appended to ``<out>/scores.csv`` and flushed, so a re-run skips the rows already scored and an
interrupted run resumes to the same CSV. ``<out>/summary.md`` is a Markdown table of means per category.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import sys
from typing import Sequence

from ..errors import EditLabError
from . import names

SUBJECT_LAYOUT = "dreambench"
REFERENCE_CACHE = 64  # subjects whose reference embeddings a run keeps (DreamBench has 30; a few KiB each)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="editlab score", description="Score existing images with EditLab's metrics.")
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``score`` subcommand's arguments (headless/runner.py's SUBCOMMANDS registry calls this)."""
    p.add_argument("--layout", required=True, choices=["pairs", "pie-bench", "dreambench"])
    p.add_argument("--data", required=True, help="pairs: the CSV; pie-bench: the PIE-Bench folder; dreambench: dataset/")
    p.add_argument("--edited", help="pie-bench: the folder of edited images (same relative paths)")
    p.add_argument("--generated", help="dreambench: <subject>/<prompt>/*.png")
    p.add_argument("--out", required=True, help="output folder for scores.csv and summary.md")
    p.add_argument("--models", action="append", default=[],
                   help="a folder holding the metric model folders (default: $COMFYUI_PATH/models/editlab_metrics)")
    p.add_argument("--metrics", default="", help="comma-separated subset (default: the layout's full set)")
    p.add_argument("--pie-bench-compat", action="store_true", help="reproduce the PIE-Bench evaluation's quirks")
    p.add_argument("--lpips-net", default="alex", choices=list(names.LPIPS_NETS))
    p.add_argument("--clip", default=names.DEFAULT_NAMES["clip"])
    p.add_argument("--dino", default=names.DEFAULT_NAMES["dino"])
    p.add_argument("--structure", default=names.DEFAULT_NAMES["structure"])
    p.add_argument("--batch", type=int, default=16, help="rows per block (default 16)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--limit", type=int, default=0, help="score only the first N rows (0: all)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--kid", action="store_true",
                   help="also the dataset's KID, sources (real) vs edited, with inception/ (not resumable: recomputed)")
    p.add_argument("--kid-subset", type=int, default=1000, help="KID subset size (capped at the set size)")


def model_dirs(args: argparse.Namespace) -> list[str]:
    if args.models:
        return args.models
    comfy = os.environ.get("COMFYUI_PATH")
    if comfy:
        return [os.path.join(comfy, "models", names.MODEL_FOLDER)]
    raise EditLabError("no model folder: pass --models DIR (holding clip-vit-large-patch14/, dino-vitb8/, ...) "
                       "or set COMFYUI_PATH")


def rows_for(args: argparse.Namespace) -> list:
    from . import datasets
    if args.layout == "pairs":
        rows = datasets.pairs_rows(args.data)
    elif args.layout == "pie-bench":
        if not args.edited:
            raise EditLabError("--layout pie-bench needs --edited (the folder of edited images)")
        rows = datasets.pie_bench_rows(args.data, args.edited)
    else:
        rows = datasets.dreambench_rows(args.data, args.generated or "")
    return rows[: args.limit] if args.limit > 0 else rows


def _keys(args: argparse.Namespace) -> list[str]:
    full = names.SUBJECT_KEYS if args.layout == SUBJECT_LAYOUT else names.EDIT_KEYS
    keys = [k.strip() for k in args.metrics.split(",") if k.strip()] or list(full)
    if args.layout != SUBJECT_LAYOUT:
        full = full + names.GUIDE_KEYS
    bad = [k for k in keys if k not in full]
    if bad:
        raise EditLabError(f"--metrics {bad} not available for --layout {args.layout}; choose from {list(full)}")
    return keys


def load_edited(args: argparse.Namespace, row):
    from . import datasets
    out = datasets.load_image(row.images["edited"])
    if args.layout == "pie-bench" and out.shape[0] != out.shape[1]:
        out = out[-512:, -512:]  # the reference crops the edited half of a [source | edited] strip
    return out


class Scorer:
    """The models a key set needs, loaded once; ``score(block)`` -> one dict per row, in order."""

    def __init__(self, args: argparse.Namespace, keys: list[str]):
        import torch
        from . import models as mm
        dirs, dev = model_dirs(args), torch.device(args.device)
        self.args, self.keys = args, keys
        self.refs: dict[tuple, dict] = {}  # reference image paths -> their embeddings (``_subject``)
        need_clip = any(k.startswith("clip") for k in keys)
        self.clip = mm.load_clip(args.clip, dirs) if need_clip else None
        self.dino = mm.load_vit("dino", args.dino, dirs) if "dino" in keys else None
        self.structure = mm.load_vit("structure", args.structure, dirs) if "structure_distance" in keys else None
        net = "squeeze" if args.pie_bench_compat else args.lpips_net
        self.lpips = mm.load_lpips(net, dirs) if "lpips" in keys else None
        for m in (self.clip and self.clip.model, self.dino and self.dino.model,
                  self.structure and self.structure.model, self.lpips and self.lpips.module):
            if m is not None:
                m.to(dev)

    def score(self, block: list) -> list[dict]:
        import torch
        from . import datasets, edit
        if self.args.layout == SUBJECT_LAYOUT:
            return self._subject(block)
        loaded = []
        for row in block:
            src, out = datasets.load_image(row.images["source"]), load_edited(self.args, row)
            loaded.append((src, out, datasets.load_mask(row.mask, tuple(src.shape[:2]))))
        results: list[dict | None] = [None] * len(block)
        # same-size rows (with or without a mask) run as one batch
        groups: dict[tuple, list[int]] = {}
        for i, (src, out, mask) in enumerate(loaded):
            groups.setdefault((tuple(src.shape), tuple(out.shape), mask is None), []).append(i)
        models = edit.EditModels(self.clip, self.structure, self.lpips)
        for (_, _, no_mask), idx in groups.items():
            src = torch.stack([loaded[i][0] for i in idx])
            out = torch.stack([loaded[i][1] for i in idx])
            mask = None if no_mask else torch.stack([loaded[i][2] for i in idx])
            prompts = [block[i].prompt or "" for i in idx]
            keys = self.keys if all(prompts) else [k for k in self.keys if not k.startswith("clip")]
            for i, res in zip(idx, edit.edit_metrics(src, out, mask, prompts if all(prompts) else None, models,
                                                     compat=self.args.pie_bench_compat, keys=keys)):
                results[i] = res
        return [r or {} for r in results]

    def _subject(self, block: list) -> list[dict]:
        """Rows with the same references and image size run as one batch; each subject's reference embeddings
        are computed once per run (``self.refs``), not once per generated image or per block."""
        import torch
        from . import datasets, edit
        gens = [datasets.load_image(r.images["generated"]) for r in block]
        groups: dict[tuple, list[int]] = {}
        for i, (row, g) in enumerate(zip(block, gens)):
            groups.setdefault((tuple(row.images["references"]), tuple(g.shape)), []).append(i)
        results: list[dict] = [{}] * len(block)
        for (refs, _), idx in groups.items():
            if refs not in self.refs:
                ref_imgs = [datasets.load_image(p) for p in refs]
                if any(r.shape != ref_imgs[0].shape for r in ref_imgs):
                    raise EditLabError(f"the reference images of {block[idx[0]].category!r} differ in size; resize "
                                       "them to one size")
                if len(self.refs) >= REFERENCE_CACHE:
                    self.refs.pop(next(iter(self.refs)))  # the oldest subject: DreamBench runs subject by subject
                self.refs[refs] = edit.reference_embeds(torch.stack(ref_imgs), self.clip, self.dino, self.keys)
            rows = edit.subject_metrics(torch.stack([gens[i] for i in idx]), self.refs[refs],
                                        [block[i].prompt or "" for i in idx], self.clip, self.dino, self.keys)
            for i, res in zip(idx, rows):
                results[i] = res
        return results


def read_done(path: str, keys: list[str]) -> tuple[list[dict], set[str]]:
    """The complete rows of an earlier run (a torn last line is dropped) and their ids."""
    if not os.path.isfile(path):
        return [], set()
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames != ["id", "category", *keys]:
            raise EditLabError(f"{path} has columns {reader.fieldnames}, not this run's {['id', 'category', *keys]}; "
                               "use another --out (or the same --metrics) to resume")
        rows = [r for r in reader if None not in r.values() and all(r[k] != "" for k in keys)]
    return rows, {r["id"] for r in rows}


def _fmt(v: float) -> str:
    return "nan" if isinstance(v, float) and math.isnan(v) else repr(float(v))


def write_csv(path: str, rows: list[dict], keys: list[str]) -> None:
    """Atomically (temp + os.replace) rewrite the CSV with complete rows only."""
    tmp = path + ".tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "category", *keys])
        for r in rows:
            w.writerow([r["id"], r["category"], *[r[k] for k in keys]])
    os.replace(tmp, path)


def summary_table(rows: list[dict], keys: list[str]) -> str:
    """Markdown: the mean of each metric per category (NaN rows left out) and over all rows."""
    from .edit import summarize
    cats = sorted({r["category"] for r in rows}, key=lambda c: (not c.isdigit(), int(c) if c.isdigit() else 0, c))
    head = "| category | n | " + " | ".join(keys) + " |\n|---|---|" + "---|" * len(keys) + "\n"
    lines = []
    for cat, sel in [(c, [r for r in rows if r["category"] == c]) for c in cats] + [("all", rows)]:
        means = summarize([{k: float(r[k]) for k in keys} for r in sel])
        lines.append(f"| {cat} | {len(sel)} | " + " | ".join(f"{means[k]:.4f}" for k in keys) + " |")
    return head + "\n".join(lines) + "\n"


def kid_line(args: argparse.Namespace, rows: list) -> str:
    """SDEdit's realism: KID between the sources (real) and the edited images, Inception-v3 pool features."""
    import torch
    from . import datasets, kid
    from . import models as mm
    if args.layout == SUBJECT_LAYOUT:
        raise EditLabError("--kid compares sources with edited images; it needs the pairs or pie-bench layout")
    net = mm.load_inception(model_dirs(args))
    net.module.to(torch.device(args.device))

    def feats(role: str) -> torch.Tensor:
        out = []
        for i in range(0, len(rows), args.batch):
            imgs = [(datasets.load_image(r.images[role]) if role == "source" else load_edited(args, r)).permute(2, 0, 1)
                    for r in rows[i:i + args.batch]]
            # Inception resizes every image to 299 px, so mixed sizes batch after that resize
            out.append(torch.cat([kid.features(net.module, im[None]) for im in imgs]) if len({im.shape for im in imgs}) > 1
                       else kid.features(net.module, torch.stack(imgs)))
        return torch.cat(out)

    mean, std = kid.kid(feats("source"), feats("edited"), subset_size=args.kid_subset)
    return f"KID (sources vs edited, {net.label}, {len(rows)} images): {mean:.5f} ± {std:.5f}"


def run(args: argparse.Namespace) -> tuple[str, str]:
    keys = _keys(args)
    rows = rows_for(args)
    if args.batch < 1:
        raise EditLabError(f"--batch must be at least 1, got {args.batch}")
    os.makedirs(args.out, exist_ok=True)
    csv_path, md_path = os.path.join(args.out, "scores.csv"), os.path.join(args.out, "summary.md")
    done_rows, done = read_done(csv_path, keys)
    write_csv(csv_path, done_rows, keys)  # drops a torn line before appending
    todo = [r for r in rows if r.id not in done]
    # fixed blocks of the dataset order: a resumed run forms the same blocks as an uninterrupted one
    blocks: dict[int, list] = {}
    for i, r in enumerate(rows):
        if r.id not in done:
            blocks.setdefault(i // args.batch, []).append(r)
    scorer = Scorer(args, keys) if todo else None
    from tqdm import tqdm
    bar = tqdm(total=len(rows), initial=len(rows) - len(todo), disable=args.no_progress, unit="img", file=sys.stderr)
    with open(csv_path, "a", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        for block in blocks.values():
            for row, res in zip(block, scorer.score(block)):
                writer.writerow([row.id, row.category, *[_fmt(res.get(k, math.nan)) for k in keys]])
            fh.flush()
            os.fsync(fh.fileno())
            bar.update(len(block))
    bar.close()
    all_rows, _ = read_done(csv_path, keys)
    table = summary_table(all_rows, keys)
    if args.kid:
        table += "\n" + kid_line(args, rows) + "\n"
    tmp = md_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(f"# Scores ({args.layout}{', PIE-Bench compat' if args.pie_bench_compat else ''})\n\n" + table)
    os.replace(tmp, md_path)
    return csv_path, md_path


def run_args(args: argparse.Namespace) -> int:
    """The ``score`` subcommand: prints the CSV and summary paths; an EditLabError reaches the CLI's handler."""
    csv_path, md_path = run(args)
    sys.stdout.write(f"{csv_path}\n{md_path}\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry (``python -m editlab.metrics.scorer``-style use and the tests)."""
    try:
        return run_args(build_parser().parse_args(argv))
    except EditLabError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
