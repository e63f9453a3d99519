"""Metric throughput (issue 13): images scored per second, EditLab's batched scorer vs a per-image loop.

The reference is the straightforward loop the PIE-Bench evaluation runs (one image at a time, the same
libraries on the same models): the Hugging Face CLIP processor + CLIPModel for CLIP (text encoded per image),
torchmetrics' PSNR / MSE / SSIM / LPIPS per image, torchvision's Resize + Normalize and the DINO ViT per image
for the structure distance. Ours: ``metrics.edit.edit_metrics`` on blocks of ``--batch`` rows, in PIE-Bench
compat mode (the same formulas: the values are compared too) and in the default mode (torch preprocessing).

Models: random weights at reduced, realistic-shape sizes (CLIP ViT-B/16-like vision tower at 224 px, a ViT
with patch 8 at 224 px = 785 tokens like DINO ViT-B/8, SqueezeNet LPIPS), written by
tests/support/random_metric_models.py's layout; no network.

``--layout dreambench``: DreamBooth's subject metrics (DINO ViT-S/16, CLIP-I, CLIP-T) over a DreamBench-shaped
folder (subjects x prompts x 4 images, ``--refs`` reference photos per subject) written to disk. The reference
is the per-image loop a subject-metrics node or script runs: for every generated image, PIL-load it and the
subject's references, the CLIP processor and torchvision's DINO transforms, the models on all of them, the
text encoder on its prompt. Ours is the scorer itself (``python -m editlab score --layout dreambench``): blocks
of ``--batch`` images, each subject's references embedded once per run, each prompt encoded once.

    python bench/bench_metrics.py [--n 32] [--batch 16] [--size 256] [--repeats 2]
    python bench/bench_metrics.py --layout dreambench [--subjects 2] [--prompts 2] [--refs 5] [--size 256]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "support"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import import_pack, machine  # noqa: E402


def write_models(root: Path) -> None:
    from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel
    import random_metric_models as rmm
    rmm.write_clip(root / "clip")  # tokenizer + preprocessor files; the network is replaced below
    n_vocab = len(json.loads((root / "clip" / "vocab.json").read_text()))
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(vocab_size=n_vocab, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                                      num_attention_heads=4, bos_token_id=n_vocab - 2, eos_token_id=n_vocab - 1,
                                      pad_token_id=n_vocab - 1),
                     vision_config=dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                                        num_attention_heads=6, image_size=224, patch_size=16), projection_dim=256)
    CLIPModel(cfg).eval().save_pretrained(str(root / "clip"), safe_serialization=True)
    pre = json.loads((root / "clip" / "preprocessor_config.json").read_text())
    pre.update(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    (root / "clip" / "preprocessor_config.json").write_text(json.dumps(pre))
    vcfg = ViTConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6,
                     image_size=224, patch_size=8, qkv_bias=True)
    ViTModel(vcfg, add_pooling_layer=False).eval().save_pretrained(str(root / "vit"), safe_serialization=True)
    rmm.write_lpips_backbone(root / "lpips")
    dcfg = ViTConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6,
                     image_size=224, patch_size=16, qkv_bias=True)  # DINO ViT-S/16's shape, fewer layers
    ViTModel(dcfg, add_pooling_layer=False).eval().save_pretrained(str(root / "dino"), safe_serialization=True)
    (root / "dino" / "preprocessor_config.json").write_text(json.dumps({  # DreamBooth's DINO transforms
        "do_resize": True, "size": {"shortest_edge": 256}, "resample": 3, "do_center_crop": True,
        "crop_size": {"height": 224, "width": 224}, "do_normalize": True,
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}))


def reference_loop(src, out, mask, prompts, clip, vit, lpips_net, processor) -> list[dict]:
    """PIE-Bench's evaluation, one image at a time (compat formulas)."""
    from torchmetrics.functional import mean_squared_error
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
    from torchvision import transforms
    from editlab.metrics.embed import _key_linear
    from editlab.metrics.pixel import pie_region
    norm = transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    resize = transforms.Resize(224, max_size=480)
    key = _key_linear(vit.model)

    def keys_ssim(img):  # img [3,H,W] float 0-255, as the reference feeds DINO
        seen = []
        h = key.register_forward_hook(lambda _m, _i, o: seen.append(o))
        vit.model(pixel_values=norm(resize(img)).unsqueeze(0), interpolate_pos_encoding=True)
        h.remove()
        k = seen[0][0]
        n = k.norm(dim=-1, keepdim=True)
        return (k @ k.T) / (n @ n.T).clamp_min(1e-8)

    def clip_score(img_u8, text):
        px = processor(images=[img_u8], return_tensors="pt")["pixel_values"]
        i = clip.image_features(px)
        tok = processor(text=[text], return_tensors="pt", padding=True)
        t = clip.model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
        t = t if isinstance(t, torch.Tensor) else t.pooler_output
        return max(float(100 * torch.nn.functional.cosine_similarity(i, t)), 0.0)

    rows = []
    with torch.inference_mode():
        for b in range(src.shape[0]):
            s, o = src[b].permute(2, 0, 1), out[b].permute(2, 0, 1)
            m = pie_region(mask[b][None])[0]
            bg = (1 - m)[None]
            sd = torch.nn.functional.mse_loss(keys_ssim(o * 255), keys_ssim(s * 255)).item()
            ps, po = (s * bg)[None], (o * bg)[None]
            row = {"structure_distance": sd,
                   "psnr": peak_signal_noise_ratio(po, ps, data_range=1.0).item(),
                   "lpips": lpips_net(po * 2 - 1, ps * 2 - 1).item(),
                   "mse": mean_squared_error(po.contiguous(), ps.contiguous()).item(),
                   "ssim": structural_similarity_index_measure(po, ps, data_range=1.0).item()}
            u8 = (o * 255).round().to(torch.uint8)
            text = prompts[b].replace("[", "").replace("]", "")
            row["clip_whole"] = clip_score(u8, text)
            row["clip_edited"] = clip_score((o * m * 255).round().to(torch.uint8), text)
            rows.append(row)
    return rows


def timed_interleaved(sides: dict, repeats: int) -> tuple[dict, dict]:
    """Run every side ``repeats`` times, interleaved (load drift hits all alike), on all cores: (times, results)."""
    times, results = {k: [] for k in sides}, {}
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    for _ in range(repeats):
        for k, fn in sides.items():
            t = time.perf_counter()
            results[k] = fn()
            times[k].append(time.perf_counter() - t)
    return times, results


def write_dreambench(root: Path, subjects: int, prompts: int, refs: int, size: int) -> tuple[Path, Path]:
    """A DreamBench-shaped dataset/ (``refs`` JPEG photos per subject) and generated/ (4 PNGs per prompt)."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    data, gen = root / "dataset", root / "generated"
    for s in range(subjects):
        (data / f"subject{s}").mkdir(parents=True, exist_ok=True)
        for k in range(refs):
            Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(data / f"subject{s}" / f"{k:02d}.jpg")
        for p in range(prompts):
            folder = gen / f"subject{s}" / f"a photo of subject{s} number {p}"
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(4):
                Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(folder / f"{k}.png")
    return data, gen


def reference_subject_loop(rows, clip, dino, processor) -> dict[str, list[float]]:
    """DreamBooth's metrics one generated image at a time (what a per-image node or script does): load the image
    and its subject's references, CLIP processor + CLIP on all of them, DINO transforms + DINO on all of them."""
    from PIL import Image
    from torchvision import transforms
    f = torch.nn.functional
    to_dino = transforms.Compose([transforms.Resize(256, interpolation=transforms.InterpolationMode.BICUBIC),
                                  transforms.CenterCrop(224), transforms.ToTensor(),
                                  transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    out = {}
    with torch.inference_mode():
        for row in rows:
            imgs = [Image.open(p).convert("RGB") for p in [row.images["generated"], *row.images["references"]]]
            e = f.normalize(clip.image_features(processor(images=imgs, return_tensors="pt")["pixel_values"]), dim=-1)
            tok = processor(text=[row.prompt], return_tensors="pt", padding=True)
            t = clip.model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
            t = f.normalize(t if isinstance(t, torch.Tensor) else t.pooler_output, dim=-1)
            d = dino.model(pixel_values=torch.stack([to_dino(i) for i in imgs])).last_hidden_state[:, 0]
            d = f.normalize(d, dim=-1)
            out[row.id] = [float((d[0] @ d[1:].T).mean()), float((e[0] @ e[1:].T).mean()), float(e[0] @ t[0])]
    return out


def dreambench(args) -> None:
    import csv
    import shutil
    from editlab.metrics import datasets, models, scorer
    from transformers import CLIPProcessor
    root = Path(tempfile.mkdtemp(prefix="bench_metrics_db_"))
    write_models(root / "models")
    data, gen = write_dreambench(root, args.subjects, args.prompts, args.refs, args.size)
    rows = datasets.dreambench_rows(str(data), str(gen))
    dirs = [str(root / "models")]
    clip, dino = models.load_clip("clip", dirs), models.load_vit("dino", "dino", dirs)
    processor = CLIPProcessor.from_pretrained(clip.path, local_files_only=True)
    argv = ["--layout", "dreambench", "--data", str(data), "--generated", str(gen), "--models", dirs[0],
            "--clip", "clip", "--dino", "dino", "--batch", str(args.batch), "--no-progress"]

    def ours():
        out = root / "scored"
        shutil.rmtree(out, ignore_errors=True)  # a fresh run each time (the scorer resumes otherwise)
        scorer.run(scorer.build_parser().parse_args(argv + ["--out", str(out)]))
        with open(out / "scores.csv", newline="") as fh:
            return {r["id"]: [float(r["dino"]), float(r["clip_i"]), float(r["clip_t"])] for r in csv.DictReader(fh)}

    sides = {"reference per-image loop": lambda: reference_subject_loop(rows, clip, dino, processor),
             "EditLab scorer (dreambench layout)": ours}
    times, results = timed_interleaved(sides, args.repeats)
    ref, mine = results["reference per-image loop"], results["EditLab scorer (dreambench layout)"]
    diff = [max(abs(a - b) for a, b in zip(ref[i], mine[i])) for i in ref]
    n = len(rows)
    print(f"machine: {machine()}; dreambench layout: {args.subjects} subjects x {args.prompts} prompts x 4 images = "
          f"{n} images of {args.size} px, {args.refs} references per subject, batch {args.batch}, "
          f"repeats {args.repeats}")
    base = min(times["reference per-image loop"])
    for k, ts in times.items():
        print(f"| {k} | {min(ts):.2f} s | {n / min(ts):.2f} img/s | {base / min(ts):.2f}x |")
    print(f"max |ours - reference| over DINO / CLIP-I / CLIP-T: {max(diff):.2e} (preprocessing: torch vs PIL resize)")
    shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--layout", choices=("pie-bench", "dreambench"), default="pie-bench")
    ap.add_argument("--subjects", type=int, default=2, help="dreambench: subjects")
    ap.add_argument("--prompts", type=int, default=2, help="dreambench: prompts per subject (4 images each)")
    ap.add_argument("--refs", type=int, default=5, help="dreambench: reference photos per subject (DreamBench: 4-6)")
    args = ap.parse_args()
    import_pack()
    if args.layout == "dreambench":
        return dreambench(args)
    from editlab.metrics import edit, models
    from transformers import CLIPProcessor
    root = Path(tempfile.mkdtemp(prefix="bench_metrics_"))
    write_models(root)
    dirs = [str(root)]
    clip, vit = models.load_clip("clip", dirs), models.load_vit("structure", "vit", dirs)
    lp = models.load_lpips("squeeze", dirs)
    processor = CLIPProcessor.from_pretrained(clip.path, local_files_only=True)
    g = torch.Generator().manual_seed(0)
    src = (torch.rand(args.n, args.size, args.size, 3, generator=g) * 255).round() / 255
    out = src.clone()
    out[:, args.size // 4: args.size // 2, args.size // 4: 3 * args.size // 4] = 0.7
    mask = torch.zeros(args.n, args.size, args.size)
    mask[:, args.size // 4: args.size // 2, args.size // 4: 3 * args.size // 4] = 1
    prompts = [f"a photo of a [cat] number {i % 4}" for i in range(args.n)]
    m = edit.EditModels(clip, vit, lp)

    def ours(compat: bool):
        rows = []
        for i in range(0, args.n, args.batch):
            sl = slice(i, i + args.batch)
            rows += edit.edit_metrics(src[sl], out[sl], mask[sl], prompts[sl], m, compat=compat)
        return rows

    sides = {"reference per-image loop (PIE-Bench style)": lambda: reference_loop(src, out, mask, prompts, clip, vit,
                                                                                  lp.module, processor),
             "ours, batched, pie_bench_compat": lambda: ours(True),
             "ours, batched, default": lambda: ours(False)}
    times, results = timed_interleaved(sides, args.repeats)
    ref = results["reference per-image loop (PIE-Bench style)"]
    comp = results["ours, batched, pie_bench_compat"]
    diff = {key: max(0.0 if a[key] == b[key] else abs(a[key] - b[key]) for a, b in zip(ref, comp))  # inf == inf
            for key in edit.EDIT_KEYS}
    print(f"machine: {machine()}; n={args.n} images of {args.size} px, batch {args.batch}, repeats {args.repeats}")
    base = min(times["reference per-image loop (PIE-Bench style)"])
    for k, ts in times.items():
        best = min(ts)
        print(f"| {k} | {best:.2f} s | {args.n / best:.2f} img/s | {base / best:.2f}x |")
    print("max |compat - reference| per metric:", {k: f"{v:.2e}" for k, v in diff.items()})


if __name__ == "__main__":
    main()
