"""The batch workers: ``ComfyWorker`` (ComfyUI loaded once per process, one executor kept alive so models
and encodings stay cached between rows) and the local backend's process pool.

A worker is anything with ``run_row(task) -> record`` built from ``Class(config)``: the pool and the Ray
backend load it by ``module:Class`` (tests use a stand-in without ComfyUI). Worker processes talk to the
pool by JSON lines on stdin / a private copy of stdout; anything they print goes to ``OUT/logs/``.
"""
from __future__ import annotations

import collections
import copy
import importlib
import importlib.util
import json
import os
import selectors
import socket
import subprocess
import sys
import time
from typing import Any, Callable, Iterator

from ..errors import EditLabError
from .batch import MAX_ATTEMPTS, atomic_row_dir, failed_record, row_files

def _worker_command(action: str, *args: str) -> list[str]:
    """A fresh interpreter running the pack's own CLI entry (``__main__.py`` imports the pack under a stable
    name from its folder), hidden subcommand ``batch-worker``."""
    return [sys.executable, os.path.join(_pack_dir(), "__main__.py"), "batch-worker", action, *args]


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip().rstrip(":")


class ComfyWorker:
    """One ComfyUI per process (``runner.boot``) and one executor for all rows (``runner.new_executor``)."""

    def __init__(self, config: dict):
        from . import runner
        if config.get("threads"):
            import torch
            torch.set_num_threads(int(config["threads"]))
        if not config.get("comfyui"):
            raise EditLabError("ComfyUI's location is unknown: pass --comfyui PATH or set COMFYUI_PATH")
        runner.boot(config["comfyui"])
        import folder_paths
        for item in config.get("model_paths") or []:
            kind, folder = item.split("=", 1)
            folder_paths.add_model_folder_path(kind, os.path.realpath(folder), is_default=True)
        if config.get("extra_model_paths"):
            from utils.extra_config import load_extra_path_config
            load_extra_path_config(config["extra_model_paths"])
        if config.get("input_dir"):
            folder_paths.set_input_directory(os.path.realpath(config["input_dir"]))
        self.runner = runner
        self.prompt = config["prompt"]
        self.out = config["out"]
        self.executor = runner.new_executor()
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        # One output folder path for every row: the executor keeps node objects, and SaveImage reads the
        # output folder once, when it is created. Each row's files are renamed from there to rows/<row>.
        self.tag = f"worker-{socket.gethostname()}-{os.getpid()}"
        folder_paths.set_output_directory(os.path.join(self.out, "rows", f".tmp-{self.tag}"))

    def run_row(self, task: dict) -> dict:
        prompt = copy.deepcopy(self.prompt)
        for node, name, value in task["set"]:
            prompt[node]["inputs"][name] = value
        for node in prompt.values():
            # The row id in the file name: output files say which row they are, and an output node whose
            # inputs repeat an earlier row's still runs (ComfyUI skips cached output nodes: no files).
            if isinstance(node["inputs"].get("filename_prefix"), str):
                node["inputs"]["filename_prefix"] = f"{task['row']}-{node['inputs']['filename_prefix']}"
        with atomic_row_dir(self.out, task["row"], self.tag) as tmp:
            self.runner.run_prompt(prompt, output_dir=tmp, executor=self.executor)
        return {"outputs": row_files(self.out, task["row"])}


def load_worker(spec: str, config: dict) -> Any:
    """``module:Class`` (``.name`` = a module of this package; ``/path/file.py:Class`` = a file)."""
    module_name, _, attr = spec.partition(":")
    if module_name.endswith(".py"):
        mspec = importlib.util.spec_from_file_location("editlab_batch_worker_" + str(abs(hash(module_name))), module_name)
        module = importlib.util.module_from_spec(mspec)
        mspec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name, package=__package__ if module_name.startswith(".") else None)
    return getattr(module, attr)(config)


def run_task(worker: Any, task: dict) -> dict:
    """One row on a worker, as a manifest record; a failing row gives its one-line error, never an exception."""
    t0 = time.perf_counter()
    try:
        got = worker.run_row(task) or {}
        error = got.get("error")
    except Exception as exc:  # the row fails alone; the worker goes on with the next one
        got, error = {}, one_line(exc)
    return {"row": task["row"], "inputs": task["inputs"], "outputs": got.get("outputs", []) if not error else [],
            "seconds": round(time.perf_counter() - t0, 4),
            "worker": getattr(worker, "name", f"{socket.gethostname()}:{os.getpid()}"), "error": error,
            "finished": round(time.time(), 3)}  # when the worker finished it (Unix time; rates, audits)


def serve(config_path: str, slot: str = "0") -> int:
    """Worker process main loop: tasks in on stdin, ``{"record": ...}`` out, one line each."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # ComfyUI's prints go to the log, not into the protocol
    with open(config_path, encoding="utf-8") as fh:
        config = json.load(fh)
    try:
        worker = load_worker(config["worker"], config)
    except BaseException as exc:
        proto.write(json.dumps({"fatal": one_line(exc)}) + "\n")
        return 3
    if not hasattr(worker, "name"):
        worker.name = f"{socket.gethostname()}:{os.getpid()}"
    proto.write(json.dumps({"ready": worker.name}) + "\n")
    for line in sys.stdin:
        if line.strip():
            proto.write(json.dumps({"record": run_task(worker, json.loads(line))}) + "\n")
    return 0


def prepare(comfyui: str) -> int:
    """Subprocess main: boot ComfyUI on the CPU, convert the workflow read from stdin, print the prompt."""
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    from . import runner
    from .convert import convert
    workflow = json.load(sys.stdin)
    runner.boot(comfyui)
    import folder_paths
    defs = runner.definitions()
    prompt = convert(workflow, defs)
    used = {v["class_type"]: defs[v["class_type"]] for v in prompt.values()}
    proto.write(json.dumps({"prompt": prompt, "definitions": used, "input_dir": folder_paths.get_input_directory()},
                           default=str))
    proto.close()
    return 0


def prepare_in_subprocess(workflow: dict, comfyui: str) -> dict:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # conversion needs no GPU: leave the GPUs to the workers
    proc = subprocess.run(_worker_command("prepare", comfyui), input=json.dumps(workflow),
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()][-1:] or ["(no message)"]
        raise EditLabError(f"could not load ComfyUI from {comfyui} to convert the workflow: {tail[0]}")
    return json.loads(proc.stdout)


def _pack_dir() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class LocalPool:
    """``workers`` processes on this machine (one per GPU when there are GPUs); one row in flight each.
    A process that dies has its row retried on a fresh process (``MAX_ATTEMPTS`` times)."""

    def __init__(self, config: dict, workers: int, *, gpus: int = 0, log_dir: str):
        self.config, self.workers, self.gpus, self.log_dir = config, workers, gpus, log_dir
        os.makedirs(log_dir, exist_ok=True)
        self.config_path = os.path.join(log_dir, "worker-config.json")
        with open(self.config_path + ".tmp", "w", encoding="utf-8") as fh:
            json.dump(config, fh)
        os.replace(self.config_path + ".tmp", self.config_path)
        self.sel = selectors.DefaultSelector()
        self.procs: dict[int, dict] = {}

    def _start(self, slot: int) -> None:
        env = dict(os.environ)
        if self.gpus:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            ids = [d.strip() for d in visible.split(",")] if visible else [str(i) for i in range(self.gpus)]
            env["CUDA_VISIBLE_DEVICES"] = ids[slot % len(ids)]
        else:  # CPU: share the cores, so two workers do not fight over every core
            threads = self.config.get("threads") or max(1, (os.cpu_count() or 1) // self.workers)
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
        log = open(os.path.join(self.log_dir, f"worker-{slot}.log"), "ab")
        proc = subprocess.Popen(_worker_command("serve", self.config_path, str(slot)),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env)
        log.close()
        os.set_blocking(proc.stdout.fileno(), False)
        self.procs[slot] = {"proc": proc, "buf": b"", "state": "starting", "task": None}
        self.sel.register(proc.stdout, selectors.EVENT_READ, slot)

    def _send(self, slot: int, task: dict) -> None:
        w = self.procs[slot]
        w["state"], w["task"] = "busy", task
        try:
            w["proc"].stdin.write((json.dumps(task) + "\n").encode())
            w["proc"].stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # it died: its end-of-file comes through the selector and the row is retried

    def run(self, tasks: Iterator[dict], emit: Callable[[dict], None]) -> None:
        pending: collections.deque = collections.deque()
        attempts: collections.Counter = collections.Counter()
        it, exhausted, start_failures = iter(tasks), False, 0
        try:
            for slot in range(self.workers):
                self._start(slot)
            while True:
                for slot, w in list(self.procs.items()):
                    if w["state"] != "idle":
                        continue
                    task = pending.popleft() if pending else None
                    if task is None and not exhausted:
                        task = next(it, None)
                        exhausted = task is None
                    if task is not None:
                        self._send(slot, task)
                if exhausted and not pending and all(w["state"] != "busy" for w in self.procs.values()):
                    break
                for key, _ in self.sel.select(timeout=1.0):
                    slot = key.data
                    w = self.procs[slot]
                    data = os.read(key.fileobj.fileno(), 1 << 16)
                    if data:
                        w["buf"] += data
                        *lines, w["buf"] = w["buf"].split(b"\n")
                        for line in lines:
                            self._message(slot, json.loads(line), emit)
                        continue
                    # End of file: the process is gone. Retry its row elsewhere, start a fresh one.
                    self.sel.unregister(key.fileobj)
                    code = w["proc"].wait()
                    task = w["task"]
                    if w["state"] == "starting":
                        start_failures += 1
                        if start_failures >= 3:
                            raise EditLabError(f"worker processes exit while starting (exit code {code}); see "
                                               f"{os.path.join(self.log_dir, f'worker-{slot}.log')}")
                    if task is not None:
                        attempts[task["row"]] += 1
                        if attempts[task["row"]] >= MAX_ATTEMPTS:
                            emit(failed_record(task, f"worker process died (exit code {code}) running this "
                                                     f"row {attempts[task['row']]} times; see {self.log_dir}"))
                        else:
                            pending.appendleft(task)
                    del self.procs[slot]
                    self._start(slot)
        except BaseException:
            self.close(kill=True)  # interrupted or failed: stop the rows in flight now (resume redoes them)
            raise
        self.close()

    def _message(self, slot: int, msg: dict, emit: Callable[[dict], None]) -> None:
        w = self.procs[slot]
        if "fatal" in msg:
            raise EditLabError(f"batch worker could not start: {msg['fatal']} "
                               f"(log: {os.path.join(self.log_dir, f'worker-{slot}.log')})")
        if "ready" in msg:
            w["state"], w["name"] = "idle", msg["ready"]
        elif "record" in msg:
            w["state"], w["task"] = "idle", None
            emit(msg["record"])

    def pids(self) -> list[int]:
        return [w["proc"].pid for w in self.procs.values()]

    def close(self, kill: bool = False) -> None:
        for w in self.procs.values():
            if kill:
                w["proc"].kill()
            try:
                w["proc"].stdin.close()
            except OSError:
                pass
        deadline = time.monotonic() + 10
        for w in self.procs.values():
            try:
                w["proc"].wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                w["proc"].kill()
                w["proc"].wait()
        self.sel.close()
        self.procs.clear()
