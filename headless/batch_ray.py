"""``editlab batch --backend ray``: the rows as a Ray Data dataset, ``map_batches`` over a pool of stateful
actors (one per GPU; one per CPU slot without GPUs), each holding one batch worker (ComfyUI loaded once).

The rows' task descriptors are streamed to JSONL shards under ``OUT/logs/tasks/`` and read back by Ray Data,
a read task per shard: no process holds the whole dataset. Ray is imported here only, and only for this
backend. ``--ray-address`` joins an existing cluster (the pack and ComfyUI must sit at the same paths on
every node, and OUT on storage every node shares); without it a local Ray instance is started for the run. The driver keeps the manifest: records stream back as rows
finish. An actor that dies is restarted by Ray and its rows are retried (Ray Data's actor pool retries);
a row that kills its actor ``MAX_ATTEMPTS`` times is recorded as failed, as with the local backend.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Callable, Iterator, Optional

from ..errors import EditLabError
from .batch import MAX_ATTEMPTS

SHARD_ROWS = 16  # task descriptors per shard file = per Ray read task = per actor call: small, so rows spread
# over actors, records come back (manifest, progress) every few rows and a retried shard redoes few rows


class RowActor:
    """A Ray Data callable class: ``__init__`` boots the worker once, ``__call__`` runs one batch of rows.
    Shipped by value (Ray's workers cannot import the pack by name), so it names no pack object; it
    imports the pack from its folder first."""

    def __init__(self, config: dict):
        import importlib.util
        if "editlab" not in sys.modules:
            root = config["pack_dir"]
            spec = importlib.util.spec_from_file_location("editlab", os.path.join(root, "__init__.py"),
                                                          submodule_search_locations=[root])
            module = importlib.util.module_from_spec(spec)
            sys.modules["editlab"] = module
            spec.loader.exec_module(module)
        from editlab.headless import batch, batch_worker
        self.run_task, self.failed_record = batch_worker.run_task, batch.failed_record
        self.worker = batch_worker.load_worker(config["worker"], config)
        self.attempts = os.path.join(config["out"], "logs", "attempts")
        self.max_attempts = config["max_attempts"]
        os.makedirs(self.attempts, exist_ok=True)

    def __call__(self, batch: dict) -> dict:
        import numpy as np
        return {"record": np.array([json.dumps(self.row(json.loads(str(t)))) for t in batch["task"]], dtype=object)}

    def row(self, task: dict) -> dict:
        # Ray retries the rows of a dead actor without limit; a row that kills its actor every time is
        # recorded as failed after max_attempts (each start leaves a mark in OUT/logs/attempts/<row>).
        mark = os.path.join(self.attempts, task["row"])
        with open(mark, "a") as fh:
            fh.write(".")
        tries = os.path.getsize(mark)
        if tries > self.max_attempts:
            record = self.failed_record(task, f"worker process died running this row {tries - 1} times; see the Ray "
                                              "worker logs")
        else:
            record = self.run_task(self.worker, task)
        os.remove(mark)
        return record


def write_task_shards(tasks: Iterator[dict], folder: str, shard: int = SHARD_ROWS) -> int:
    """Stream the task descriptors into ``folder/part-NNNNN.jsonl`` files of ``shard`` rows (constant memory);
    return how many were written. The folder is rewritten on every run (resume skips done rows upstream)."""
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    n, fh = 0, None
    try:
        for task in tasks:
            if n % shard == 0:
                if fh is not None:
                    fh.close()
                fh = open(os.path.join(folder, f"part-{n // shard:05d}.jsonl"), "w", encoding="utf-8")
            fh.write(json.dumps({"task": json.dumps(task)}) + "\n")
            n += 1
    finally:
        if fh is not None:
            fh.close()
    return n


def run(config: dict, tasks: Iterator[dict], emit: Callable[[dict], None], *, workers: Optional[int] = None,
        address: Optional[str] = None, total: int = 0) -> int:
    """Run the tasks on ``workers`` actors (default: one per GPU of the cluster, else 1); return that number."""
    try:
        import ray
        import ray.cloudpickle
        import ray.data
    except ImportError as exc:
        raise EditLabError(f"--backend ray needs Ray Data ({exc}): pip install 'ray[data]', or use --backend local") from None
    started = not ray.is_initialized()
    if started:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=max(workers or 1, 1), include_dashboard=False, log_to_driver=False)
    config = dict(config, max_attempts=MAX_ATTEMPTS)
    shutil.rmtree(os.path.join(config["out"], "logs", "attempts"), ignore_errors=True)  # marks of a killed run
    try:
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # the batch has its own progress line
        cluster_gpus = int(ray.cluster_resources().get("GPU", 0))
        workers = workers or cluster_gpus or 1
        per_actor = {"num_gpus": 1} if cluster_gpus else {"num_cpus": 1}
        if cluster_gpus and workers > cluster_gpus:
            raise EditLabError(f"--workers {workers}: the Ray cluster has {cluster_gpus} GPUs (one actor per GPU)")
        folder = os.path.join(config["out"], "logs", "tasks")
        # shards small enough that every actor gets several (``total``: the rows, known from the plan's check)
        shard = max(1, min(SHARD_ROWS, total // (4 * workers)))
        rows = write_task_shards(tasks, folder, shard)
        if not rows:
            return workers
        # Ray Data reads the shards in streaming fashion (a read task per shard): neither the driver nor any
        # single process holds the dataset's rows; on a cluster OUT is shared storage, as the outputs need.
        # num_cpus=0: a read task must not wait for a CPU slot that the actors hold (deadlock on a small cluster)
        ds = ray.data.read_json(folder, lines=True, file_extensions=["jsonl"], num_cpus=0,
                                 override_num_blocks=-(-rows // shard))  # a block per shard, never merged
        out = ds.map_batches(RowActor, fn_constructor_args=(config,), batch_size=1, batch_format="numpy",
                             compute=ray.data.ActorPoolStrategy(size=workers), **per_actor)
        try:
            for row in out.iter_rows():
                emit(json.loads(row["record"]))
            return workers
        except (ray.exceptions.RayError, RuntimeError) as exc:
            first = str(exc).strip().splitlines()[:1] or [type(exc).__name__]
            raise EditLabError(f"the Ray run stopped: {first[0]}; rows finished so far are in the manifest, run the "
                               "same command again to resume") from None
    finally:
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        if started:
            ray.shutdown()
