"""What the batch-runner tests (pure and engine tier) use: a stand-in worker (no ComfyUI) that the worker
processes load from this file, the manifest and every row's inputs / outputs / error / output bytes read back,
and a worker killed mid-run."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import time

from editlab.headless.batch import atomic_row_dir, row_files




def records(out) -> list[dict]:
    """Every manifest record, in order."""
    with open(os.path.join(out, "manifest.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def results(out) -> dict:
    """Per row: inputs, outputs, error and the bytes of every output (what must not depend on the workers)."""
    res = {}
    for r in records(out):
        files = {p: open(os.path.join(out, p), "rb").read() for p in r["outputs"]}
        res[r["row"]] = (json.dumps(r["inputs"], sort_keys=True), r["outputs"], r["error"], files)
    return res


class KillOther:
    """An ``on_record`` callback: once two worker processes have reported, SIGKILL the one that did not just
    report (it is busy with a row). A process that already died (a row that kills its worker, then restarted
    under a new pid) is dropped and the next record picks again. ``killed`` lists the pids killed."""

    def __init__(self):
        self.pids: list[int] = []
        self.killed: list[int] = []

    def __call__(self, record: dict) -> None:
        pid = int(record["worker"].split(":")[1]) if record["worker"] != "batch" else None
        if pid and pid not in self.pids:
            self.pids.append(pid)
        if self.killed or pid is None:
            return
        for victim in [p for p in reversed(self.pids) if p != pid]:
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                self.pids.remove(victim)
                continue
            self.killed.append(victim)
            return


class StandIn:
    """A worker without ComfyUI: its output file is a function of the row's inputs only (like a seeded
    workflow). ``prompt`` values steer it: ``boom`` raises, ``die`` kills the process every time,
    ``die-once`` kills it the first time only."""

    def __init__(self, config: dict):
        self.out, self.sleep = config["out"], config.get("sleep", 0.0)

    def run_row(self, task: dict) -> dict:
        values = {f"{n}.{i}": v for n, i, v in task["set"]}
        prompt = values.get("2.text", "")
        if prompt == "boom":
            raise ValueError("boom row\nsecond line")
        marker = os.path.join(self.out, f"died-{task['row']}")
        if prompt == "die" or (prompt == "die-once" and not os.path.exists(marker)):
            open(marker, "w").close()
            os._exit(9)
        time.sleep(self.sleep)
        with open(values["1.image"], "rb") as fh:
            pixels = fh.read()
        with atomic_row_dir(self.out, task["row"], str(os.getpid())) as tmp:
            with open(os.path.join(tmp, "out.bin"), "wb") as fh:
                fh.write(hashlib.sha256(pixels + json.dumps(values, sort_keys=True).encode()).digest())
        return {"outputs": row_files(self.out, task["row"])}
