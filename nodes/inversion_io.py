"""Save Inversion / Load Inversion: INVERSION records as safetensors files in ComfyUI's output/ and
input/ ``inversions`` folders (atomic writes, paths confined to those folders)."""
from __future__ import annotations

import os
import re

import folder_paths
from comfy_api.latest import io

from ..samplers.inversion import Inversion
from . import fingerprint
from .common import EditLabError, EditLabNode, check_choice, to_latent_space
from .inversion_common import INVERSION_CATEGORY, InversionType

INVERSIONS_DIR = "inversions"
NAMINGS = ["fixed", "numbered"]
# File names are limited to 255 bytes; the temporary file adds a dot, a counter, the pid and suffixes.
MAX_PREFIX = 100


def _inversion_dirs() -> dict[str, str]:
    return {"input": os.path.join(folder_paths.get_input_directory(), INVERSIONS_DIR),
            "output": os.path.join(folder_paths.get_output_directory(), INVERSIONS_DIR)}


def list_inversions() -> list[str]:
    names = []
    for kind, folder in _inversion_dirs().items():
        if os.path.isdir(folder):
            names += [f"{kind}/{f}" for f in sorted(os.listdir(folder)) if f.endswith(".safetensors")]
    return names


def resolve_inversion(name: str) -> str:
    """The file for a listed name, confined to the two inversions folders."""
    kind, _, fname = name.partition("/")
    folders = _inversion_dirs()
    if kind not in folders or not fname or os.path.basename(fname) != fname:
        raise EditLabError(f"{name!r} is not an inversion file name (expected input/NAME or output/NAME)")
    folder = os.path.realpath(folders[kind])
    path = os.path.realpath(os.path.join(folder, fname))
    if os.path.commonpath([folder, path]) != folder:
        raise EditLabError(f"{name!r} points outside the inversions folder")
    if not os.path.isfile(path):
        raise EditLabError(f"inversion file not found: {path} (searched {', '.join(folders.values())})")
    return path


def sanitize_prefix(prefix: str) -> str:
    """The file name prefix: its last path component, other characters than letters, digits, . _ - and
    spaces replaced by _, at most MAX_PREFIX characters (refused beyond: a silent cut could collide)."""
    clean = re.sub(r"[^A-Za-z0-9._ -]", "_", os.path.basename(prefix.replace("\\", "/"))).strip(" .")
    clean = clean or "inversion"
    if len(clean) > MAX_PREFIX:
        raise EditLabError(
            f"filename_prefix is too long: {len(clean)} characters ({clean[:24]!r}...); at most {MAX_PREFIX} are "
            "allowed (file names are limited to 255 bytes). Shorten it")
    return clean


def save_inversion(inv: Inversion, prefix: str, extra_meta: dict, naming: str = "fixed") -> str:
    """Write the inversion atomically as output/inversions/PREFIX.safetensors (``fixed``: replaces a file of
    that name) or PREFIX_00001.safetensors, the first free number (``numbered``); returns the file name."""
    from safetensors.torch import save_file

    check_choice(naming, NAMINGS, "naming")
    base = sanitize_prefix(prefix)
    folder = _inversion_dirs()["output"]
    os.makedirs(folder, exist_ok=True)
    if naming == "fixed":
        name = f"{base}.safetensors"
    else:
        existing = set(os.listdir(folder))
        n = 1
        while f"{base}_{n:05d}.safetensors" in existing:
            n += 1
        name = f"{base}_{n:05d}.safetensors"
    tensors, meta = inv.with_nulls(inv.null_embeddings, **extra_meta).to_state() if extra_meta else inv.to_state()
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, os.path.join(folder, name))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return name


def load_inversion(path: str) -> Inversion:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # safetensors' own error types (corrupt, truncated or foreign files), translated here
        raise EditLabError(f"{path} is not a readable safetensors file, or is truncated ({exc}); save inversions "
                           "with EditLab Save Inversion, and copy the whole file") from exc
    return Inversion.from_state(tensors, meta, where=path)


class SaveInversion(EditLabNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EditLabSaveInversion",
            display_name="Save Inversion",
            category=INVERSION_CATEGORY,
            description="Saves an INVERSION (trajectory, null embeddings, schedule, source conditioning, model "
                        "fingerprint) as a safetensors file in output/inversions/, atomically. One inversion serves "
                        "many edits: load it with Load Inversion (from output/ or input/inversions). naming 'fixed' "
                        "saves PREFIX.safetensors (the same name every run, so a Load Inversion keeps pointing at "
                        "it); 'numbered' keeps every run as PREFIX_00001, PREFIX_00002, ...",
            inputs=[
                InversionType.Input("inversion", tooltip="The inversion to save."),
                io.String.Input("filename_prefix", default="inversion",
                                tooltip=f"File name prefix (letters, digits, . _ - and spaces; folders are not "
                                        f"allowed; at most {MAX_PREFIX} characters)."),
                io.String.Input("source_prompt", default="", multiline=True,
                                tooltip="The source prompt text, stored in the file's metadata for reference."),
                io.Combo.Input("naming", options=NAMINGS, default="fixed", optional=True,
                               tooltip="fixed: output/inversions/PREFIX.safetensors, replaced on every run (a stable "
                                       "name for Load Inversion). numbered: PREFIX_00001.safetensors, the next free "
                                       "number each run (keeps every inversion)."),
            ],
            outputs=[io.String.Output(display_name="name", tooltip="The saved name, as Load Inversion lists it.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, inversion, filename_prefix, source_prompt, naming="fixed") -> io.NodeOutput:
        inv: Inversion = inversion.validate()
        name = save_inversion(inv, filename_prefix, {"source_prompt": source_prompt} if source_prompt else {}, naming)
        return io.NodeOutput(f"output/{name}")


class LoadInversion(EditLabNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EditLabLoadInversion",
            display_name="Load Inversion",
            category=INVERSION_CATEGORY,
            description="Loads an INVERSION saved by Save Inversion from input/inversions or output/inversions. "
                        "Connect the model to be warned when the file was made with another one.",
            inputs=[
                io.Combo.Input("inversion", options=list_inversions(),
                               tooltip="output/NAME = saved by this ComfyUI; input/NAME = copied into input/inversions."),
                io.Model.Input("model", tooltip="The model to edit with: scales the noise latent, and a warning is logged "
                                                "when the inversion was made with another model."),
            ],
            outputs=[
                InversionType.Output(display_name="inversion", tooltip="The loaded inversion: trajectory, schedule, source conditioning, model fingerprint."),
                io.Latent.Output(display_name="noise", tooltip="x_T (latent space) to start sampling from."),
                io.Sigmas.Output(display_name="sigmas", tooltip="The schedule to sample with."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, inversion, model):
        path = resolve_inversion(inversion)
        st = os.stat(path)
        return f"{path}:{st.st_mtime_ns}:{st.st_size}"

    @classmethod
    def validate_inputs(cls, inversion):
        try:
            resolve_inversion(inversion)
        except EditLabError as exc:
            return f"inversion: {exc}"  # the pack's queue-time message form: "input: what is wrong"
        return True

    @classmethod
    def execute(cls, inversion, model) -> io.NodeOutput:
        inv = load_inversion(resolve_inversion(inversion))
        fingerprint.check_model(inv, model, strict=False)
        noise = to_latent_space(model, inv.noise.clone())
        return io.NodeOutput(inv, {"samples": noise}, inv.sigmas.clone())
