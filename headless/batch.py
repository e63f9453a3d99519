"""Run one workflow over a dataset: ``python -m editlab batch WORKFLOW --data SPEC --out DIR``.

Orchestration only (no ComfyUI import at module import time): the data source, the ``--bind`` bindings,
per-row seeds, the manifest (the source of truth, resumable), progress, and the local backend (one
worker process per device, see ``headless/batch_worker.py``). ``--backend ray`` hands the same tasks to
Ray Data (``headless/batch_ray.py``; Ray is imported there only).

Layout of OUT: ``batch.json`` (what the run is: resuming with another command is refused),
``manifest.jsonl`` (one record per finished row: row id, inputs, output paths, seconds, worker, error,
finished time),
``rows/<row id>/`` (each row's files, written to a temporary folder then renamed), ``logs/``.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

from ..errors import EditLabError

PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
SEED_INPUTS = ("seed", "noise_seed")
UPLOAD_OPTIONS = ("image_upload", "video_upload", "audio_upload")
DEFAULT_WORKER = ".batch_worker:ComfyWorker"
MAX_ATTEMPTS = 2  # a row whose worker dies this many times is recorded as failed (it kills workers)


# ----------------------------------------------------------------------------------------- data sources
@dataclass
class Source:
    """A dataset: ``rows()`` streams ``(row_id, {column: value})``; relative paths resolve against ``root``."""
    kind: str
    root: str
    rows: Callable[[], Iterator[tuple[str, dict]]]
    path_columns: tuple[str, ...] = ()
    spec: str = ""  # the --data value, resolved: part of the run's identity
    # columns whose file the runner makes from the row when a binding needs it: column -> fn(row_id, row, out)
    # returning the file's path under OUT (e.g. PIE-Bench's RLE masks decoded to pictures)
    derived: dict[str, Callable[[str, dict, str], str]] = field(default_factory=dict)


def failed_record(task: dict, error: str) -> dict:
    """The manifest record of a row that failed outside a worker's own run (bad input, a worker that died)."""
    return {"row": task["row"], "inputs": task["inputs"], "outputs": [], "seconds": 0.0, "worker": "batch",
            "error": error, "finished": round(time.time(), 3)}


def _pie_mask_file(row_id: str, row: dict, out: str) -> str:
    """PIE-Bench's RLE edit mask as a picture (white = edited, 512 x 512 like its images), written once under
    ``OUT/_masks/`` (atomically): bind it to a Load Image (Mask) node, e.g. ``--bind LoadImageMask.image=mask_path``."""
    path = os.path.join(out, "_masks", safe_id(row_id) + ".png")
    if not os.path.isfile(path):
        import numpy as np
        from PIL import Image
        from ..metrics.datasets import decode_rle
        rle = row.get("mask_rle")
        if not isinstance(rle, list) or len(rle) % 2:
            raise ValueError(f"its 'mask' is not PIE-Bench's RLE list of (start, length) pairs: {str(rle)[:60]}")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        Image.fromarray((decode_rle(rle, (512, 512)) * 255).astype(np.uint8), "L").save(tmp, format="PNG")
        os.replace(tmp, path)
    return path


def _folder(root: str) -> Source:
    def rows():
        for dirpath, dirnames, files in os.walk(root):
            dirnames.sort()
            for name in sorted(files):
                if name.lower().endswith(IMAGE_EXTS):
                    rel = os.path.relpath(os.path.join(dirpath, name), root)
                    yield os.path.splitext(rel)[0].replace(os.sep, "__"), {
                        "image_path": os.path.join(dirpath, name), "image": rel, "name": os.path.splitext(name)[0]}
    return Source("folder", root, rows, ("image_path",))


def _csv(path: str) -> Source:
    def rows():
        with open(path, newline="", encoding="utf-8") as fh:
            for n, row in enumerate(csv.DictReader(fh), start=1):
                yield str(row.get("id") or n), dict(row)
    return Source("csv", os.path.dirname(path), rows)


def _jsonl(path: str) -> Source:
    def rows():
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as exc:
                    raise EditLabError(f"{path} line {n} is not JSON ({exc}); fix or remove that line") from None
                if not isinstance(row, dict):
                    raise EditLabError(f"{path} line {n} is not a JSON object; each line must be {{column: value}}")
                yield str(row.get("id", n)), row
    return Source("jsonl", os.path.dirname(path), rows)


def _pie_bench(root: str) -> Source:
    """PIE-Bench (Ju et al., PnP Inversion, 2024): ``mapping_file.json`` + ``annotation_images/``.
    Prompts carry ``[word]`` marks of the edited words; ``*_prompt`` columns are without them
    (``*_prompt_marked`` keep them)."""
    mapping = os.path.join(root, "mapping_file.json")

    def rows():
        with open(mapping, encoding="utf-8") as fh:
            data = json.load(fh)  # metadata only (prompts, paths): the images stay on disk
        for key in sorted(data):
            item = data[key]
            row = {k: v for k, v in item.items() if k != "mask"}  # the RLE mask is not a path or a widget value
            row["image_path"] = os.path.join(root, "annotation_images", item["image_path"])
            row["mask_rle"] = item.get("mask")
            row["mask_path"] = ""  # made from mask_rle when bound (Source.derived)
            for col in ("original_prompt", "editing_prompt"):
                row[col + "_marked"] = item.get(col, "")
                row[col] = item.get(col, "").replace("[", "").replace("]", "")
            yield key, row
    if not os.path.isfile(mapping):
        raise EditLabError(f"pie-bench layout: {mapping} not found (expected mapping_file.json and annotation_images/)")
    return Source("pie-bench", root, rows, ("image_path",), derived={"mask_path": _pie_mask_file})


def _dreambench(root: str) -> Source:
    """DreamBench (Ruiz et al., DreamBooth, 2023): subject folders + ``prompts_and_classes.txt``; one row per
    (subject, prompt): ``prompt`` has the class noun only (zero-shot), ``prompt_token`` uses ``sks``."""
    base = os.path.join(root, "dataset") if os.path.isdir(os.path.join(root, "dataset")) else root
    spec = next((p for p in (os.path.join(root, "prompts_and_classes.txt"), os.path.join(base, "prompts_and_classes.txt"))
                 if os.path.isfile(p)), None)
    if spec is None:
        raise EditLabError(f"dreambench layout: prompts_and_classes.txt not found in {root}")
    text = open(spec, encoding="utf-8").read()
    classes = dict(re.findall(r"^([A-Za-z0-9_]+),([^\n,]+)$", text.split("Prompts")[0], re.M))
    classes.pop("subject_name", None)
    lists = [re.findall(r"'([^']*)'\s*\.format", part) for part in re.split(r"Live Subject Prompts", text, maxsplit=1)]
    object_prompts, live_prompts = lists[0], lists[1] if len(lists) > 1 else lists[0]

    def rows():
        for subject in sorted(classes):
            folder = os.path.join(base, subject)
            images = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTS)) if os.path.isdir(folder) else []
            cls = classes[subject].strip()
            prompts = live_prompts if cls in ("dog", "cat") else object_prompts
            for i, template in enumerate(prompts):
                yield f"{subject}-{i:02d}", {
                    "subject": subject, "class": cls, "prompt_index": i,
                    "image_path": os.path.join(folder, images[0]) if images else os.path.join(folder, "missing"),
                    "prompt": " ".join(template.replace("{0}", "").replace("{1}", cls).split()),
                    "prompt_token": template.replace("{0}", "sks").replace("{1}", cls)}
    return Source("dreambench", base, rows, ("image_path",))


LAYOUTS = {"pie-bench": _pie_bench, "dreambench": _dreambench}


def open_source(spec: str) -> Source:
    """``--data``: a folder of images, a .csv / .jsonl file, or ``pie-bench:DIR`` / ``dreambench:DIR``."""
    source = _open_source(spec)
    kind, _, rest = spec.partition(":")
    source.spec = f"{kind}:{os.path.realpath(rest)}" if kind in LAYOUTS and rest else os.path.realpath(spec)
    return source


def _open_source(spec: str) -> Source:
    kind, _, rest = spec.partition(":")
    if kind in LAYOUTS and rest:
        return LAYOUTS[kind](os.path.realpath(rest))
    path = os.path.realpath(spec)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "mapping_file.json")):
            return _pie_bench(path)
        return _folder(path)
    if not os.path.isfile(path):
        raise EditLabError(f"--data {spec}: no such file or folder (give a folder of images, a .csv, a .jsonl, "
                           f"or {' / '.join(k + ':DIR' for k in LAYOUTS)})")
    if path.lower().endswith(".csv"):
        return _csv(path)
    if path.lower().endswith((".jsonl", ".ndjson")):
        return _jsonl(path)
    raise EditLabError(f"--data {spec}: unknown kind of file; use a .csv or .jsonl (one row per line)")


# ------------------------------------------------------------------------------------ bindings and seeds
@dataclass
class Binding:
    label: str       # as the user wrote it, NODE.INPUT
    node: str        # resolved node id
    input: str
    column: str
    is_path: bool    # the value is a file: resolved against the data root and confined


def find_node(prompt: dict, ref: str, what: str) -> str:
    """A node by id, title or class type, resolved as ``--set`` resolves it (``convert.find_nodes``); unique."""
    from .convert import find_nodes
    matches = find_nodes(prompt, ref)
    if len(matches) != 1:
        shown = ", ".join(f"#{k} {prompt[k]['class_type']}" + (f" '{prompt[k]['_meta']['title']}'"
                          if prompt[k].get("_meta", {}).get("title") not in (None, prompt[k]["class_type"]) else "")
                          for k in (matches or sorted(prompt, key=lambda s: (0, int(s)) if s.isdigit() else (1, s))))
        raise EditLabError(f"{what}: node '{ref}' matches {len(matches)} nodes; name it by id, title or a class type "
                           f"only one node has ({'matching' if matches else 'nodes'}: {shown})")
    return matches[0]


def _input_spec(definitions: Optional[dict], prompt: dict, node: str, name: str, what: str) -> Any:
    ctype = prompt[node]["class_type"]
    if definitions is None or ctype not in definitions:
        if name not in prompt[node]["inputs"]:
            raise EditLabError(f"{what}: node #{node} {ctype} has no input '{name}' "
                               f"(inputs: {', '.join(prompt[node]['inputs'])})")
        return None
    from .convert import is_widget, ordered_inputs
    specs = dict(ordered_inputs(definitions[ctype]))
    if name not in specs:
        raise EditLabError(f"{what}: node #{node} {ctype} has no input '{name}' (inputs: {', '.join(specs)})")
    if not is_widget(specs[name]):
        raise EditLabError(f"{what}: input '{name}' of node #{node} {ctype} is a socket (a link), not a value; "
                           "bind a widget input (a file name, a prompt, a seed, a number)")
    return specs[name]


def parse_bindings(items: list[str], prompt: dict, definitions: Optional[dict], source: Source) -> list[Binding]:
    out = []
    for item in items:
        target, sep, column = item.partition("=")
        if not sep or "." not in target or not column:
            raise EditLabError(f"--bind expects NODE.INPUT=COLUMN, got {item!r}")
        ref, name = target.rsplit(".", 1)
        node = find_node(prompt, ref, f"--bind {item!r}")
        spec = _input_spec(definitions, prompt, node, name, f"--bind {item!r}")
        opts = spec[1] if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict) else {}
        is_path = column in source.path_columns or column.endswith(("path", "_file")) or any(opts.get(o) for o in UPLOAD_OPTIONS)
        out.append(Binding(target, node, name, column, is_path))
    return out


def seed_inputs(prompt: dict, definitions: Optional[dict], bindings: list[Binding]) -> list[tuple[str, str, int]]:
    """Every unlinked ``seed`` / ``noise_seed`` value that no binding sets: (node, input, max value)."""
    bound = {(b.node, b.input) for b in bindings}
    found = []
    for nid, node in prompt.items():
        for name in SEED_INPUTS:
            value = node["inputs"].get(name)
            if (nid, name) in bound or isinstance(value, list) or not isinstance(value, int):
                continue
            spec = (definitions or {}).get(node["class_type"], {})
            spec = dict((spec.get("required") or {}), **(spec.get("optional") or {})).get(name)
            opts = spec[1] if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict) else {}
            found.append((nid, name, int(min(opts.get("max", 2**32 - 1), 2**63 - 1))))
    return sorted(found, key=lambda t: (int(t[0]) if t[0].isdigit() else 0, t[0], t[1]))


def derive_seed(run_seed: int, row_id: str, key: str, max_value: int) -> int:
    """A row's seed from the run seed and the row id only (not the worker, not the number of workers)."""
    digest = hashlib.sha256(f"{run_seed}\0{row_id}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % (max_value + 1)


def safe_id(row_id: str) -> str:
    """The row id as a folder name: letters, digits, ``._-`` kept; anything else becomes ``_``."""
    out = re.sub(r"[^A-Za-z0-9._-]", "_", row_id).strip(".") or "_"
    return out[:200]


def _coerce(value: Any, spec: Any, current: Any) -> Any:
    """A data value (CSV cells are text) as the input's type: INT, FLOAT, BOOLEAN, else as given."""
    kind = spec[0] if isinstance(spec, (list, tuple)) and spec else None
    if kind is None and isinstance(current, (bool, int, float)) and not isinstance(current, list):
        kind = {bool: "BOOLEAN", int: "INT", float: "FLOAT"}[type(current)]
    if kind == "INT" and not isinstance(value, int):
        return int(value.strip()) if isinstance(value, str) else int(value)
    if kind == "FLOAT" and not isinstance(value, float):
        return float(value)
    if kind == "BOOLEAN" and isinstance(value, str):
        if value.strip().lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"{value!r} is not a boolean (true/false)")
        return value.strip().lower() in ("true", "1")
    if kind in ("STRING",) or isinstance(kind, (list, tuple)) or kind == "COMBO":
        return value if isinstance(value, str) else str(value)
    return value


# ------------------------------------------------------------------------------------------------ plan
@dataclass
class Plan:
    """Everything checked before any work: prompt, bindings, seeds, data, confinement, output folder."""
    prompt: dict
    definitions: Optional[dict]
    source: Source
    bindings: list[Binding]
    seeds: list[tuple[str, str, int]]
    run_seed: int
    out: str
    roots: list[str]
    total: int = 0
    worker_config: dict = field(default_factory=dict)

    def identity(self) -> dict:
        """What determines the outputs: resuming into OUT with a different one is refused."""
        blob = json.dumps(self.prompt, sort_keys=True).encode()
        return {"prompt_sha256": hashlib.sha256(blob).hexdigest(), "data": self.source.spec, "data_kind": self.source.kind,
                "bind": [f"{b.label}={b.column}" for b in self.bindings], "seed": self.run_seed,
                "seed_inputs": [f"{n}.{i}" for n, i, _ in self.seeds]}


def _confined(plan: Plan, row_id: str, column: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise EditLabError(f"row {row_id}: column '{column}' is bound as a file path but holds {value!r}")
    path = os.path.realpath(value if os.path.isabs(value) else os.path.join(plan.source.root, value))
    for root in plan.roots:
        if os.path.commonpath([path, root]) == root:
            return path
    raise EditLabError(f"row {row_id}: {column} = {value!r} resolves to {path}, outside the dataset root and ComfyUI's "
                       f"input folder ({', '.join(plan.roots)}); move the file inside one of them")


def check_rows(plan: Plan) -> int:
    """One streaming pass before any work: unique row ids, bound columns present, paths confined."""
    seen: dict[str, str] = {}
    n = 0
    for row_id, row in plan.source.rows():
        sid = safe_id(row_id)
        if sid in seen:
            raise EditLabError(f"--data: rows '{seen[sid]}' and '{row_id}' have the same id (folder name '{sid}'); "
                               "give every row a unique 'id'")
        seen[sid] = row_id
        for b in plan.bindings:
            if b.column not in row:
                raise EditLabError(f"--bind {b.label}={b.column}: row {row_id} has no column '{b.column}' "
                                   f"(columns: {', '.join(map(str, row))})")
            if b.is_path and b.column not in plan.source.derived:
                _confined(plan, row_id, b.column, row[b.column])
        n += 1
    if n == 0:
        raise EditLabError(f"--data: no rows in {plan.source.root} ({plan.source.kind})")
    return n


def make_task(plan: Plan, row_id: str, row: dict) -> dict:
    """What a worker needs for one row: the inputs to set (node id, input, value); or the row's error."""
    task: dict = {"row": safe_id(row_id), "inputs": {}, "set": []}
    try:
        for b in plan.bindings:
            if b.column in plan.source.derived:  # a file the runner makes under OUT (confined by construction)
                value = plan.source.derived[b.column](row_id, row, plan.out)
            else:
                value = _confined(plan, row_id, b.column, row[b.column]) if b.is_path else row[b.column]
            spec = None
            if plan.definitions and plan.prompt[b.node]["class_type"] in plan.definitions:
                from .convert import ordered_inputs
                spec = dict(ordered_inputs(plan.definitions[plan.prompt[b.node]["class_type"]])).get(b.input)
            value = _coerce(value, spec, plan.prompt[b.node]["inputs"].get(b.input))
            task["inputs"][b.label] = value
            task["set"].append([b.node, b.input, value])
    except (ValueError, TypeError) as exc:
        task["error"] = f"bad value for {b.label} (column '{b.column}'): {exc}"
    for node, name, top in plan.seeds:
        value = derive_seed(plan.run_seed, task["row"], f"{node}.{name}", top)
        task["inputs"][f"{node}.{name}"] = value
        task["set"].append([node, name, value])
    return task


# -------------------------------------------------------------------------------------------- manifest
def read_manifest(path: str) -> dict[str, dict]:
    """The latest record of each row; a torn or unreadable line (an interrupted write) is ignored."""
    records: dict[str, dict] = {}
    if not os.path.isfile(path):
        return records
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and "row" in rec:
                records[rec["row"]] = rec
    return records


class Manifest:
    """Append-only JSONL: one line per finished row, flushed as it is written (a killed run loses nothing
    already written), synced to disk at most once a second (a sync per row would cap a many-GPU run)."""

    def __init__(self, path: str):
        self.path = path
        if os.path.isfile(path) and os.path.getsize(path):
            with open(path, "rb+") as fh:  # a torn last line (killed mid-write): cut it so the next append is whole
                data = fh.read()
                if not data.endswith(b"\n"):
                    fh.truncate(data.rfind(b"\n") + 1)
        self.fh = open(path, "a", encoding="utf-8")
        self.synced = time.monotonic()

    def write(self, record: dict) -> None:
        self.fh.write(json.dumps(record, sort_keys=True) + "\n")
        self.fh.flush()
        if time.monotonic() - self.synced >= 1.0:
            os.fsync(self.fh.fileno())
            self.synced = time.monotonic()

    def close(self) -> None:
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()


def atomic_row_dir(out: str, row: str, tag: str):
    """A context: a fresh temporary folder ``rows/.tmp-<tag>`` for a row's files, renamed to ``rows/<row>``
    on success (removed on failure). A worker passes its own tag: one folder path for all its rows."""
    import contextlib

    @contextlib.contextmanager
    def ctx():
        final = os.path.join(out, "rows", row)
        tmp = os.path.join(out, "rows", f".tmp-{tag}")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if os.path.isdir(final):  # left by a run killed between rename and manifest write: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
    return ctx()


def row_files(out: str, row: str) -> list[str]:
    """A row's output files, relative to OUT (sorted)."""
    base = os.path.join(out, "rows", row)
    return sorted(os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(base) for f in fs)


# -------------------------------------------------------------------------------------------- progress
class Progress:
    """One line for the run: a bar, rows done / failed / skipped, rows per second, time left."""

    def __init__(self, total: int, skipped: int, stream=None, enabled: bool = True):
        self.total, self.skipped, self.done, self.failed = total, skipped, 0, 0
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.t0 = self.last = time.monotonic()
        self.tty = getattr(self.stream, "isatty", lambda: False)()

    def update(self, record: dict) -> None:
        self.failed += bool(record.get("error"))
        self.done += not record.get("error")
        now = time.monotonic()
        if self.enabled and (self.tty or now - self.last >= 5 or self.finished()):
            self.last = now
            self.stream.write(("\r" if self.tty else "") + self.line() + ("" if self.tty else "\n"))
            self.stream.flush()

    def finished(self) -> bool:
        return self.skipped + self.done + self.failed >= self.total

    def rate(self) -> float:
        return (self.done + self.failed) / max(time.monotonic() - self.t0, 1e-9)

    def line(self) -> str:
        n = self.skipped + self.done + self.failed
        width = 24
        fill = int(width * n / max(self.total, 1))
        left = (self.total - n) / self.rate() if self.rate() > 0 else float("nan")
        return (f"batch [{'#' * fill}{'.' * (width - fill)}] {n}/{self.total}  done {self.done}  failed {self.failed}"
                f"  skipped {self.skipped}  {self.rate():.2f} rows/s  left {left:.0f}s ")

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")


# ------------------------------------------------------------------------------------------------- run
def gpu_count() -> int:
    """GPUs visible to this process (workers default to one per GPU); CUDA_VISIBLE_DEVICES is honoured."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    import torch  # only here: the CLI's other paths stay light
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _lock(out: str):
    import fcntl
    fh = open(os.path.join(out, ".lock"), "w")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        raise EditLabError(f"another batch run is writing to {out}; wait for it or use another --out") from None
    return fh


def _check_identity(out: str, identity: dict) -> None:
    path = os.path.join(out, "batch.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            old = json.load(fh)
        diff = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
        if diff:
            raise EditLabError(f"{out} holds a run of another command (differs in: {', '.join(diff)}); resume with the "
                               "same workflow, data, bindings and seed, or use a new --out")
        return
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(identity, fh, indent=1, sort_keys=True)
    os.replace(tmp, path)


def run_batch(plan: Plan, *, backend: str = "local", workers: Optional[int] = None, retry_failed: bool = False,
              on_record: Optional[Callable[[dict], None]] = None, progress: bool = True,
              ray_address: Optional[str] = None) -> dict:
    """Run every row not yet in the manifest; return the summary. Resumable: run it again to finish."""
    rows_dir = os.path.join(plan.out, "rows")
    os.makedirs(rows_dir, exist_ok=True)
    lock = _lock(plan.out)
    try:
        _check_identity(plan.out, plan.identity())
        for name in os.listdir(rows_dir):  # temporary folders of rows that were running when a run died
            if name.startswith(".tmp-"):
                shutil.rmtree(os.path.join(rows_dir, name), ignore_errors=True)
        previous = read_manifest(os.path.join(plan.out, "manifest.jsonl"))
        skip = {r for r, rec in previous.items() if not (retry_failed and rec.get("error"))}
        gpus = gpu_count() if backend == "local" else 0
        requested, workers = workers, workers or gpus or 1
        manifest = Manifest(os.path.join(plan.out, "manifest.jsonl"))
        bar = Progress(plan.total, skipped=0, enabled=progress)

        def emit(record: dict) -> None:
            manifest.write(record)
            bar.update(record)
            if on_record is not None:
                on_record(record)

        def tasks() -> Iterator[dict]:
            for row_id, row in plan.source.rows():
                task = make_task(plan, row_id, row)
                if task["row"] in skip:
                    bar.skipped += 1
                    continue
                if "error" in task:
                    emit(failed_record(task, task["error"]))
                    continue
                yield task

        t0 = time.monotonic()
        try:
            if backend == "ray":
                from . import batch_ray
                workers = batch_ray.run(plan.worker_config, tasks(), emit, workers=requested, address=ray_address,
                                        total=plan.total)
            elif backend == "local":
                from .batch_worker import LocalPool
                LocalPool(plan.worker_config, workers, gpus=gpus, log_dir=os.path.join(plan.out, "logs")).run(tasks(), emit)
            else:
                raise EditLabError(f"--backend {backend!r}: use 'local' or 'ray'")
        finally:
            manifest.close()
            bar.close()
        seconds = time.monotonic() - t0
        final = read_manifest(os.path.join(plan.out, "manifest.jsonl"))
        return {"rows": plan.total, "ran": bar.done + bar.failed, "done": bar.done, "failed": bar.failed,
                "skipped": bar.skipped, "seconds": round(seconds, 3), "rows_per_s": round((bar.done + bar.failed) / max(seconds, 1e-9), 4),
                "ok_total": sum(not r.get("error") for r in final.values()),
                "failed_total": sum(bool(r.get("error")) for r in final.values()), "workers": workers, "backend": backend}
    finally:
        lock.close()


# ------------------------------------------------------------------------------------------- plan + CLI
def _prompt_and_definitions(workflow: Any, comfyui: Optional[str], worker: str) -> tuple[dict, Optional[dict], Optional[str]]:
    """The API prompt, the definitions of its node types and ComfyUI's input folder. ComfyUI runs in this
    process only if it is already loaded here; otherwise a short subprocess converts (so this process never
    holds a GPU context that the workers need)."""
    from . import runner
    from .convert import convert
    wf = runner.load_workflow(workflow) if isinstance(workflow, str) else workflow
    if runner._BOOTED:
        import folder_paths
        defs = runner.definitions()
        prompt = convert(wf, defs)
        return prompt, {v["class_type"]: defs[v["class_type"]] for v in prompt.values()}, folder_paths.get_input_directory()
    is_api = isinstance(wf, dict) and wf and all(isinstance(v, dict) and "class_type" in v for v in wf.values())
    if comfyui and worker == DEFAULT_WORKER:
        from .batch_worker import prepare_in_subprocess
        got = prepare_in_subprocess(wf, comfyui)
        return got["prompt"], got["definitions"], got["input_dir"]
    if not is_api:
        raise EditLabError("a UI-format workflow is converted with ComfyUI's node definitions: pass --comfyui PATH "
                           "or set COMFYUI_PATH")
    return wf, None, os.path.join(comfyui, "input") if comfyui else None


def make_plan(workflow: Any, data: str, out: str, *, bind: list[str] = (), seed: int = 0, keep_seeds: bool = False,
              comfyui: Optional[str] = None, input_dir: Optional[str] = None, model_paths: list[str] = (),
              extra_model_paths: Optional[str] = None, threads: Optional[int] = None,
              worker: str = DEFAULT_WORKER) -> Plan:
    """Check everything before any work (bad bindings, missing columns, paths outside the roots)."""
    source = open_source(data)
    prompt, definitions, comfy_input = _prompt_and_definitions(workflow, comfyui, worker)
    for item in model_paths:
        if "=" not in item:
            raise EditLabError(f"--model-path expects KIND=DIR (e.g. checkpoints=/data/ckpts), got {item!r}")
    roots = [os.path.realpath(source.root)] + [os.path.realpath(p) for p in (input_dir or comfy_input,) if p]
    bindings = parse_bindings(list(bind), prompt, definitions, source)
    plan = Plan(prompt=prompt, definitions=definitions, source=source, bindings=bindings,
                seeds=[] if keep_seeds else seed_inputs(prompt, definitions, bindings), run_seed=int(seed),
                out=os.path.realpath(out), roots=roots)
    plan.total = check_rows(plan)
    plan.worker_config = {"worker": worker, "prompt": prompt, "out": plan.out, "comfyui": comfyui,
                          "input_dir": input_dir, "model_paths": list(model_paths), "extra_model_paths": extra_model_paths,
                          "threads": threads, "pack_dir": PACK_DIR}
    return plan


def score(plan: Plan, prompt_input: Optional[str] = None, extra: list[str] = ()) -> Any:
    """``--score``: the finished rows as a ``pairs`` CSV (source = the row's bound image file, edited = its first
    output image, prompt = the value bound to ``prompt_input``) scored by ``metrics/scorer.py``; ``extra``
    are more scorer options (e.g. ``--models DIR``, ``--metrics ...``). Scores go to OUT/scores/."""
    try:
        from ..metrics import scorer
    except ImportError as exc:
        raise EditLabError(f"--score needs metrics/scorer.py, which this pack does not have ({exc}); run without "
                           f"--score and score {os.path.join(plan.out, 'manifest.jsonl')} later") from None
    sources = [b.label for b in plan.bindings if b.is_path]
    if not sources:
        raise EditLabError("--score compares each output with the row's source image: bind an image file (e.g. "
                           "--bind LoadImage.image=image_path)")
    if prompt_input and prompt_input not in {b.label for b in plan.bindings}:
        raise EditLabError(f"--score-prompt {prompt_input}: not one of the --bind targets "
                           f"({', '.join(b.label for b in plan.bindings)})")
    lines = [["id", "source", "edited"] + (["prompt"] if prompt_input else [])]
    for row, rec in sorted(read_manifest(os.path.join(plan.out, "manifest.jsonl")).items()):
        images = [p for p in rec.get("outputs") or [] if p.lower().endswith(IMAGE_EXTS)]
        if rec.get("error") or not images:
            continue
        lines.append([row, rec["inputs"][sources[0]], os.path.join(plan.out, images[0])]
                     + ([rec["inputs"].get(prompt_input, "")] if prompt_input else []))
    path = os.path.join(plan.out, "score_pairs.csv")
    with open(path + ".tmp", "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows(lines)
    os.replace(path + ".tmp", path)
    args = scorer.build_parser().parse_args(["--layout", "pairs", "--data", path,
                                             "--out", os.path.join(plan.out, "scores"), *extra])
    return scorer.run(args)


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="editlab batch", description="Run a workflow over a dataset.")
    p.add_argument("workflow", help="workflow .json (UI or API format)")
    p.add_argument("--data", required=True, help="folder of images, .csv, .jsonl, pie-bench:DIR or dreambench:DIR")
    p.add_argument("--out", required=True, help="output folder (manifest.jsonl, rows/<id>/); rerun to resume")
    p.add_argument("--bind", action="append", default=[], metavar="NODE.INPUT=COLUMN",
                   help="set an input from a column for each row; NODE is a node id, title or unique class type")
    p.add_argument("--backend", choices=("local", "ray"), default="local")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: one per GPU, 1 on CPU)")
    p.add_argument("--seed", type=int, default=0, help="run seed: each row's seeds derive from it and the row id")
    p.add_argument("--keep-seeds", action="store_true", help="keep the workflow's seed values (no per-row seeds)")
    p.add_argument("--retry-failed", action="store_true", help="on resume, run again the rows that failed")
    p.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="ComfyUI checkout (default: $COMFYUI_PATH)")
    p.add_argument("--input-dir", default=None, help="ComfyUI input folder for the workers")
    p.add_argument("--model-path", action="append", default=[], metavar="KIND=DIR",
                   help="add a model folder for the workers (e.g. checkpoints=/data/ckpts)")
    p.add_argument("--extra-model-paths", default=None, help="an extra_model_paths.yaml for the workers")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per worker (default: cores / workers)")
    p.add_argument("--ray-address", default=None, help="an existing Ray cluster (default: start a local one)")
    p.add_argument("--score", action="store_true", help="score the outputs with metrics/scorer.py when done "
                   "(source = the bound image file, edited = the row's first image; scores in OUT/scores/)")
    p.add_argument("--score-prompt", default=None, metavar="NODE.INPUT", help="the --bind target holding the edit prompt")
    p.add_argument("--score-arg", action="append", default=[], metavar="ARG",
                   help="pass an option to the scorer, e.g. --score-arg=--models --score-arg=/models/metrics")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--worker", default=DEFAULT_WORKER, help=argparse.SUPPRESS)  # module:Class (tests: a stand-in)
    return p


def run_args(args: argparse.Namespace) -> int:
    from .convert import WorkflowError
    from .runner import RunError
    try:
        if args.workers is not None and args.workers < 1:
            raise EditLabError(f"--workers {args.workers}: use 1 or more")
        plan = make_plan(args.workflow, args.data, args.out, bind=args.bind, seed=args.seed, keep_seeds=args.keep_seeds,
                         comfyui=args.comfyui, input_dir=args.input_dir, model_paths=args.model_path,
                         extra_model_paths=args.extra_model_paths, threads=args.threads, worker=args.worker)
        summary = run_batch(plan, backend=args.backend, workers=args.workers, retry_failed=args.retry_failed,
                            progress=not args.quiet, ray_address=args.ray_address)
        sys.stdout.write(f"batch: {summary['rows']} rows, ran {summary['ran']} ({summary['done']} done, {summary['failed']} failed), "
              f"skipped {summary['skipped']} already done, {summary['seconds']:.1f}s, {summary['rows_per_s']:.3f} rows/s "
              f"on {summary['workers']} {summary['backend']} worker(s); in total {summary['ok_total']} ok, "
              f"{summary['failed_total']} failed; manifest: {os.path.join(plan.out, 'manifest.jsonl')}\n")
        if args.score:
            for written in score(plan, args.score_prompt, args.score_arg):
                sys.stdout.write(f"{written}\n")
        return 1 if summary["failed_total"] else 0
    except (EditLabError, RunError, WorkflowError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2


def main(argv: Optional[list[str]] = None) -> int:
    """``editlab batch ...`` (argv without the word ``batch``), or an argparse Namespace from runner.main."""
    if isinstance(argv, argparse.Namespace):
        return run_args(argv)
    return run_args(build_parser().parse_args(argv))
