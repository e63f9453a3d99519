"""Run a ComfyUI workflow headless, in-process, on ComfyUI's own validator and executor.

    python -m editlab run WORKFLOW.json --comfyui PATH [--set NODE.INPUT=VALUE ...] [--out DIR]

(from the folder that holds the pack, e.g. ``ComfyUI/custom_nodes``, or from inside the pack; a relative
WORKFLOW path that does not exist from the working directory is looked up in the pack, so
``workflows/<name>.json`` works from both.)

Loads ComfyUI from PATH (its built-in nodes plus this pack, or the ``custom_nodes`` folder with
``--all-custom-nodes``), converts the UI-format workflow to API format with the loaded node
definitions, validates it with ``execution.validate_prompt``, executes it with
``execution.PromptExecutor`` and reports the images written. Errors are one clear line and a non-zero
exit.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import os
import re
import sys
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

from ..errors import EditLabError
from .convert import apply_overrides, convert
from . import batch as _batch  # `editlab batch`; imports neither ComfyUI nor Ray
from ..metrics import scorer as _scorer  # `editlab score`; imports torch only when it runs

PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_MESSAGES = 1000  # executor notifications kept per run (progress events of one run stay far below this)


class RunError(EditLabError):
    """A workflow failed to validate or execute; the message is one line for the user."""


@dataclass
class RunResult:
    prompt: dict
    images: list[str] = field(default_factory=list)
    outputs: dict = field(default_factory=dict)
    executor: Any = None

    def node_output(self, node_id: str | int) -> Optional[list]:
        """The raw outputs of an executed node (its returned tuple, per list item), from the cache."""
        entry = self.executor.caches.outputs.get(str(node_id))
        if entry is None:
            return None
        return getattr(entry, "outputs", entry)


class _Server:
    """The part of ComfyUI's PromptServer that the executor talks to, without a network."""

    def __init__(self, verbose: bool = False):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        # The last notifications of the current run; cleared by every run_prompt, bounded within one.
        self.messages: collections.deque[tuple[str, Any]] = collections.deque(maxlen=MAX_MESSAGES)
        self.verbose = verbose

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass

    def __getattr__(self, name):  # any other notification is a no-op here
        return lambda *a, **k: None


_BOOTED: dict[str, Any] = {}


def boot(comfyui_path: str, *, all_custom_nodes: bool = False, quiet: bool = True,
         base_directory: Optional[str] = None) -> Any:
    """Import ComfyUI from ``comfyui_path`` in this process and load its nodes and this pack (once).
    ``base_directory``: ComfyUI's ``--base-directory`` (models, input, output folders; default the checkout)."""
    comfyui_path = os.path.abspath(comfyui_path)
    if _BOOTED.get("path") == comfyui_path:
        return _BOOTED["nodes"]
    if _BOOTED:
        raise RunError(f"ComfyUI was already loaded from {_BOOTED['path']}; one process runs one ComfyUI")
    if not os.path.isfile(os.path.join(comfyui_path, "nodes.py")) or not os.path.isdir(os.path.join(comfyui_path, "comfy")):
        raise RunError(f"{comfyui_path} is not a ComfyUI checkout (no nodes.py / comfy/); pass --comfyui PATH or set COMFYUI_PATH")
    if comfyui_path not in sys.path:
        sys.path.insert(0, comfyui_path)
    if quiet and logging.getLogger().level < logging.ERROR:
        logging.getLogger().setLevel(logging.ERROR)
    import comfy.options
    comfy.options.enable_args_parsing(False)
    import comfy.cli_args
    import torch
    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
    if base_directory:
        if not os.path.isdir(base_directory):
            raise RunError(f"--base-directory {base_directory} is not a folder")
        comfy.cli_args.args.base_directory = os.path.abspath(base_directory)  # read by folder_paths on import
    import comfy.utils
    import comfy.model_management
    # ComfyUI's nodes.py puts comfy/ first on sys.path, after which a bare `import utils` finds comfy/utils.py,
    # not ComfyUI's utils/ package: main.py imports the package first, so the extras that import `server`
    # (Image From Batch, Image Stitch...) load. Do the same, or they fail to import and vanish silently.
    import utils.install_util  # noqa: F401
    import nodes
    import execution  # noqa: F401  (imports the executor with the nodes)

    def progress_hook(value, total, preview_image, prompt_id=None, node_id=None):
        comfy.model_management.throw_exception_if_processing_interrupted()

    comfy.utils.set_progress_bar_global_hook(progress_hook)

    async def load():
        await nodes.init_extra_nodes(init_custom_nodes=all_custom_nodes, init_api_nodes=False)
        if not all_custom_nodes or not _pack_in_custom_nodes(comfyui_path):
            ok = await nodes.load_custom_node(PACK_DIR)
            if not ok:
                raise RunError(f"ComfyUI could not load the EditLab pack from {PACK_DIR} (see the log above)")

    asyncio.run(load())
    _BOOTED.update(path=comfyui_path, nodes=nodes)
    return nodes


def _pack_in_custom_nodes(comfyui_path: str) -> bool:
    cn = os.path.realpath(os.path.join(comfyui_path, "custom_nodes"))
    return os.path.dirname(os.path.realpath(PACK_DIR)) == cn


def definitions() -> dict[str, dict]:
    nodes = _BOOTED["nodes"]
    return {name: cls.INPUT_TYPES() for name, cls in nodes.NODE_CLASS_MAPPINGS.items()}


def display_names() -> dict[str, str]:
    """The names the UI shows for node classes (e.g. EditLabSDEPerturb -> 'SDE Perturb (SDEdit)')."""
    nodes = _BOOTED["nodes"]
    names = dict(nodes.NODE_DISPLAY_NAME_MAPPINGS)
    for name, cls in nodes.NODE_CLASS_MAPPINGS.items():
        if name not in names and hasattr(cls, "GET_NODE_INFO_V1"):
            names[name] = cls.GET_NODE_INFO_V1().get("display_name") or name
    return names


def object_info() -> dict[str, dict]:
    """What ComfyUI's ``/object_info`` reports for every loaded node (inputs, outputs, names)."""
    nodes = _BOOTED["nodes"]
    shown = display_names()
    info = {}
    for name, cls in nodes.NODE_CLASS_MAPPINGS.items():
        if hasattr(cls, "GET_NODE_INFO_V1"):
            info[name] = cls.GET_NODE_INFO_V1()
            continue
        outputs = list(cls.RETURN_TYPES)
        info[name] = {
            "input": cls.INPUT_TYPES(), "output": outputs,
            "output_name": list(getattr(cls, "RETURN_NAMES", None) or outputs), "name": name,
            "display_name": shown.get(name, name), "output_node": bool(getattr(cls, "OUTPUT_NODE", False)),
            "description": getattr(cls, "DESCRIPTION", ""), "category": getattr(cls, "CATEGORY", "sd"),
        }
    return info


def build_workflows(folder: str) -> list[str]:
    """Regenerate the example workflows from their specs, written atomically as UI-format JSON."""
    from .examples import EXAMPLES

    info = object_info()
    written = []
    os.makedirs(folder, exist_ok=True)
    for title, make in EXAMPLES.items():
        path = os.path.join(folder, title + ".json")
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(make(info), fh, indent=1)
            fh.write("\n")
        os.replace(tmp, path)
        written.append(path)
    return written


def find_workflow(path: str) -> str:
    """``path`` as given (absolute, or relative to the working directory), else relative to the pack: the
    shipped ``workflows/<name>.json`` are found from ``custom_nodes`` and from inside the pack alike."""
    if os.path.isfile(path) or os.path.isabs(path):
        return path
    in_pack = os.path.join(PACK_DIR, path)
    if os.path.isfile(in_pack):
        return in_pack
    raise RunError(f"workflow file not found: {path} (looked in {os.getcwd()} and in the pack, {PACK_DIR})")


def load_workflow(path: str) -> dict:
    path = find_workflow(path)
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError as exc:
        raise RunError(f"workflow file not found: {path}") from exc
    except json.JSONDecodeError as exc:
        raise RunError(f"{path} is not valid JSON ({exc})") from exc


def pack_relative(text: str) -> str:
    """ComfyUI names a custom node pack's modules after the pack's absolute path
    (``/x/custom_nodes/editlab.errors.EditLabError``): shorten those names to the pack folder's name
    (``editlab.errors.EditLabError``) so an error line reads the same on every machine."""
    for name in sorted((m for m in list(sys.modules) if "/" in m or "\\" in m), key=len, reverse=True):
        if name + "." in text:
            text = text.replace(name + ".", re.split(r"[\\/]", name)[-1] + ".")
    return text


MODEL_INPUT_FOLDERS = {"ckpt_name": "checkpoints", "lora_name": "loras", "control_net_name": "controlnet",
                       "vae_name": "vae", "unet_name": "diffusion_models", "clip_name": "text_encoders",
                       "folder": "blip_diffusion"}


def _searched(input_name: str) -> str:
    """For a missing model file: the folders ComfyUI searched for it."""
    import folder_paths
    kind = MODEL_INPUT_FOLDERS.get(input_name)
    if kind is None:
        return ""
    try:
        return f" (searched {', '.join(folder_paths.get_folder_paths(kind)) or 'no folder'} for '{kind}' files)"
    except KeyError:
        return ""


def _format_validation(error: dict, node_errors: dict, prompt: dict) -> str:
    parts = [error.get("message", "invalid prompt")]
    if error.get("details"):
        parts.append(str(error["details"]))
    for nid, info in (node_errors or {}).items():
        ctype = prompt.get(nid, {}).get("class_type", "?")
        for err in info.get("errors", []):
            name = (err.get("extra_info") or {}).get("input_name", "")
            extra = _searched(name) if err.get("type") == "value_not_in_list" else ""
            parts.append(f"node #{nid} {ctype}: {err.get('message')}: {err.get('details')}{extra}")
    return pack_relative("; ".join(p for p in parts if p))


def new_executor():
    """A PromptExecutor as ComfyUI's server keeps one: pass it to every ``run_prompt`` of a session and
    unchanged nodes come from its output cache (a re-queued graph recomputes only what changed)."""
    import execution
    return execution.PromptExecutor(_Server(), cache_type=False)


def run_prompt(prompt: dict, *, output_dir: Optional[str] = None, executor=None) -> RunResult:
    """Validate and execute an API-format prompt on the booted ComfyUI; return the written images.
    ``executor``: one from ``new_executor`` to keep the output cache between runs (default: a fresh one)."""
    import execution
    import folder_paths

    if output_dir is not None:
        os.makedirs(output_dir, exist_ok=True)
        folder_paths.set_output_directory(os.path.abspath(output_dir))
    os.makedirs(folder_paths.get_temp_directory(), exist_ok=True)  # as main.py does at start (Plot Loss Graph needs it)
    prompt_id = str(uuid.uuid4())
    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    if not valid:
        raise RunError("invalid workflow: " + _format_validation(error, node_errors, prompt))
    executor = executor or new_executor()
    executor.server.messages.clear()  # a kept executor serves many runs: keep only this run's notifications
    executor.execute(prompt, prompt_id, {}, outputs)
    if not executor.success:
        for event, data in executor.status_messages:
            if event == "execution_error":
                raise RunError(pack_relative(f"node #{data['node_id']} {data['node_type']} failed: "
                                             f"{data['exception_type']}: {str(data['exception_message']).strip()}"))
            if event == "execution_interrupted":
                raise RunError(f"interrupted at node #{data['node_id']} {data['node_type']}")
        raise RunError("execution failed (no error message was reported)")
    history = executor.history_result.get("outputs", {})
    images = []
    for node_out in history.values():
        for img in node_out.get("images", []) or []:
            base = folder_paths.get_directory_by_type(img.get("type", "output")) or folder_paths.get_output_directory()
            images.append(os.path.join(base, img.get("subfolder", ""), img["filename"]))
    return RunResult(prompt=prompt, images=images, outputs=history, executor=executor)


def run_workflow(workflow: dict | str, *, comfyui_path: Optional[str] = None, overrides: Iterable[str] = (),
                 output_dir: Optional[str] = None, base_directory: Optional[str] = None) -> RunResult:
    """Boot ComfyUI if needed, convert a UI workflow (dict or path), apply overrides, run it."""
    path = comfyui_path or os.environ.get("COMFYUI_PATH")
    if not path:
        raise RunError("ComfyUI's location is unknown: pass --comfyui PATH or set COMFYUI_PATH")
    boot(path, base_directory=base_directory)
    wf = load_workflow(workflow) if isinstance(workflow, str) else workflow
    defs, names = definitions(), display_names()
    prompt = apply_overrides(convert(wf, defs, names), overrides, defs, names)
    return run_prompt(prompt, output_dir=output_dir)


def _out(line: str) -> None:
    sys.stdout.write(line + "\n")


def _cmd_run(args: argparse.Namespace) -> int:
    if args.print_prompt:
        boot(args.comfyui or "", base_directory=args.base_directory)
        _out(json.dumps(convert(load_workflow(args.workflow), definitions(), display_names()), indent=1))
        return 0
    result = run_workflow(args.workflow, comfyui_path=args.comfyui, overrides=args.overrides, output_dir=args.out,
                          base_directory=args.base_directory)
    for image in result.images:
        _out(image)
    return 0


def _add_run(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("workflow", help="workflow .json (as saved by ComfyUI, or API format); a relative path "
                                         "is looked up in the working directory, then in the pack")
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"),
                        help="ComfyUI checkout (default: $COMFYUI_PATH)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="NODE.INPUT=VALUE",
                        help="override an input; NODE is a node id, the title the UI shows or a class type only one "
                             "node has; VALUE is JSON or text")
    parser.add_argument("--out", default=None, help="output folder (default: ComfyUI's output folder)")
    parser.add_argument("--base-directory", default=None, metavar="DIR",
                        help="as ComfyUI's --base-directory: the folder holding models/, input/, output/ "
                             "(default: the ComfyUI checkout)")
    parser.add_argument("--print-prompt", action="store_true", help="print the API-format prompt and exit")


def _cmd_build(args: argparse.Namespace) -> int:
    boot(args.comfyui or "")
    for path in build_workflows(args.folder):
        _out(path)
    return 0


def _add_build(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"))
    parser.add_argument("--folder", default=os.path.join(PACK_DIR, "workflows"))


def _cmd_batch_worker(args: argparse.Namespace) -> int:
    from . import batch_worker
    logging.getLogger().setLevel(logging.ERROR)  # a worker's log file keeps ComfyUI's errors
    return getattr(batch_worker, args.action)(*args.args)


def _add_batch_worker(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("serve", "prepare"))
    parser.add_argument("args", nargs="*")


# Subcommands: name -> (help, add its arguments, run it -> exit code). A new subcommand is one entry here.
SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "run": ("run a UI- or API-format workflow JSON", _add_run, _cmd_run),
    "build-workflows": ("regenerate workflows/*.json from headless/examples.py", _add_build, _cmd_build),
    "batch": ("run a workflow over a dataset, resumable (headless/batch.py)", _batch.build_parser, _batch.run_args),
    "score": ("score existing images with the metric set, resumable (metrics/scorer.py)", _scorer.add_arguments, _scorer.run_args),
    "batch-worker": ("internal: one worker process of 'batch' (started by it)", _add_batch_worker, _cmd_batch_worker),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="editlab", description="Run EditLab/ComfyUI workflows headless.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, handler) in SUBCOMMANDS.items():
        command = sub.add_parser(name, help=help_text)
        add_arguments(command)
        command.set_defaults(handler=handler)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    # The CLI reports every failure as one line of its own; ComfyUI's log lines would repeat it.
    logging.getLogger().setLevel(logging.CRITICAL)
    try:
        return args.handler(args)
    except EditLabError as exc:
        sys.stderr.write(f"error: {pack_relative(str(exc))}\n")
        return 2
