"""Queue-time validation of every EditLab node by ComfyUI's own ``execution.validate_prompt``.

ComfyUI 0.3.64 does not check a schema-style node's combo values, and a ``validate_inputs(**kwargs)``
turns its min/max checks off, so ``EditLabNode.validate_inputs`` does both. Here every registered
EditLab node is put in a minimal prompt (its sockets fed by stand-in source nodes of the right type,
its first output fed to a stand-in output node) and each Combo / Int / Float widget gets an invalid
value: the prompt must be refused, naming the input. The same prompt with the defaults, and the
shipped workflows, must still validate (so the refusals are not the harness failing).
"""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BOGUS = "not-an-option-9f3c"
# Workflows whose every file exists in the engine fixture: they must validate as a whole.
SELF_CONTAINED = ["SDEdit - stroke painting to image", "SDEdit - masked stroke edit of a photo",
                  "SDEdit - t0 search (realism vs faithfulness)", "GLIDE-style inpainting (any checkpoint)",
                  "Dual CFG - prompt vs extra condition balance"]
# Workflows that load a file made by another workflow: that node may only refuse it as missing.
NEEDS_A_SAVED_FILE = {"Inversion - load a saved inversion, two edits": "EditLabLoadInversion"}


def editlab_node_ids() -> list[str]:
    import nodes
    return sorted(k for k in nodes.NODE_CLASS_MAPPINGS if k.startswith("EditLab"))


def validate(prompt: dict):
    import execution
    return asyncio.run(execution.validate_prompt("editlab-validation-test", json.loads(json.dumps(prompt)), None))


def _stand_in(kind: str, io_type):
    """A classic-style node class: a source of one ``io_type`` output, or an output node taking one."""
    if kind == "source":
        attrs = {"INPUT_TYPES": classmethod(lambda cls: {"required": {}}), "RETURN_TYPES": (io_type,)}
    else:
        attrs = {"INPUT_TYPES": classmethod(lambda cls: {"required": {"value": (io_type,)}}), "RETURN_TYPES": (),
                 "OUTPUT_NODE": True}
    return type(f"ValidationTest{kind.title()}", (), {**attrs, "FUNCTION": "run", "CATEGORY": "testing"})


@pytest.fixture(scope="module")
def harness(engine):
    """node_id -> (prompt with the node's defaults as '1', its widget specs by name, whether it lists files).

    A combo that lists files (e.g. saved inversions) is empty in a fresh ComfyUI: such a node gets a
    placeholder name and is left out of the defaults check (nothing valid exists to put there)."""
    import nodes
    from comfy_api.latest import io

    ids = editlab_node_ids()  # before the stand-ins are registered
    added = {}
    cases = {}

    def register(kind, io_type) -> str:
        key = f"_ValidationTest{kind.title()}{len(added)}"
        added[key] = _stand_in(kind, io_type)
        nodes.NODE_CLASS_MAPPINGS[key] = added[key]
        return key

    for node_id in ids:
        cls = nodes.NODE_CLASS_MAPPINGS[node_id]
        declared = cls.INPUT_TYPES()
        prompt, widgets, inputs, lists_files = {}, {}, {}, False
        for spec in cls.define_schema().inputs:
            if isinstance(spec, io.WidgetInput) and not spec.force_input:
                widgets[spec.id] = spec
                inputs[spec.id] = default_value(spec)
                if isinstance(spec, io.Combo.Input) and not spec.options:
                    lists_files, inputs[spec.id] = True, "output/none-yet.safetensors"
            elif not spec.optional:
                io_type = declared["required"][spec.id][0]
                src = str(len(prompt) + 2)
                prompt[src] = {"class_type": register("source", io_type), "inputs": {}}
                inputs[spec.id] = [src, 0]
        prompt["1"] = {"class_type": node_id, "inputs": inputs}
        if not getattr(cls, "OUTPUT_NODE", False):
            assert cls.RETURN_TYPES, f"{node_id} has neither outputs nor is an output node"
            prompt["0"] = {"class_type": register("sink", cls.RETURN_TYPES[0]), "inputs": {"value": ["1", 0]}}
        cases[node_id] = (prompt, widgets, lists_files)
    yield cases
    for key in added:
        nodes.NODE_CLASS_MAPPINGS.pop(key, None)


def default_value(spec):
    from comfy_api.latest import io
    if spec.default is not None:
        return spec.default
    if isinstance(spec, io.Combo.Input):
        return (spec.options or [None])[0]
    if isinstance(spec, (io.Int.Input, io.Float.Input)):
        return spec.min if spec.min is not None else 0
    if isinstance(spec, io.Boolean.Input):
        return False
    return ""


def errors_of(node_errors: dict) -> list[str]:
    return [f"{e.get('message')}: {e.get('details')}" for e in node_errors.get("1", {}).get("errors", [])]


def with_value(prompt: dict, name: str, value) -> dict:
    out = json.loads(json.dumps(prompt))
    out["1"]["inputs"][name] = value
    return out


def test_every_editlab_node_is_covered_and_validates_with_its_defaults(harness):
    """The harness itself is sound: each node's default prompt passes, so every refusal below is the value's."""
    assert len(harness) >= 15, sorted(harness)  # SDEdit, inversion, P2P, subject, dual CFG nodes are all here
    failures = {}
    for node_id, (prompt, _, lists_files) in harness.items():
        if lists_files:
            continue
        valid, error, _, node_errors = validate(prompt)
        if not valid:
            failures[node_id] = (error, node_errors)
    assert not failures, failures


def test_every_combo_refuses_an_unknown_value_naming_the_input(harness):
    from comfy_api.latest import io
    checked, missed = [], []
    for node_id, (prompt, widgets, _) in harness.items():
        for name, spec in widgets.items():
            if not isinstance(spec, io.Combo.Input) or not spec.options:
                continue  # an empty list (e.g. no files yet) has nothing to check against
            valid, _, _, node_errors = validate(with_value(prompt, name, BOGUS))
            errs = errors_of(node_errors)
            checked.append(f"{node_id}.{name}")
            if valid or not any(f"{name}: {BOGUS!r}" in e for e in errs):
                missed.append((f"{node_id}.{name}", valid, errs))
    assert not missed, missed
    # The SDEdit / Dual CFG choices that used to fall back silently are among those checked.
    for expected in ("EditLabReverseSDESampler.mode", "EditLabKnownRegionSampler.mask_convention",
                     "EditLabKnownRegionSampler.known_noise", "EditLabKnownRegionSampler.replace_on",
                     "EditLabDualCFGCombiner.schedule", "EditLabInstructPix2PixEncode.size_fit",
                     "EditLabSDEPerturb.scheduler"):
        assert expected in checked, expected


def test_every_bounded_number_refuses_values_outside_its_range_naming_the_input(harness):
    from comfy_api.latest import io
    checked, missed = 0, []
    for node_id, (prompt, widgets, _) in harness.items():
        for name, spec in widgets.items():
            if not isinstance(spec, (io.Int.Input, io.Float.Input)):
                continue
            for bound, value, words in (("min", None if spec.min is None else spec.min - 1, "below the minimum"),
                                        ("max", None if spec.max is None else spec.max + 1, "above the maximum")):
                if value is None:
                    continue
                valid, _, _, node_errors = validate(with_value(prompt, name, value))
                errs = errors_of(node_errors)
                checked += 1
                if valid or not any(f"{name}: " in e and words in e for e in errs):
                    missed.append((f"{node_id}.{name} {bound}", value, valid, errs))
    assert not missed, missed
    assert checked >= 20, checked


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "workflows").glob("*.json")))
def test_shipped_workflows_pass_the_validator(engine, name):
    """No EditLab node refuses a shipped workflow's values; the self-contained ones validate entirely
    (the others load checkpoints or model folders the engine fixture does not create)."""
    prompt = engine.prompt(name)
    valid, error, _, node_errors = validate(prompt)
    ours = {nid: e for nid, e in node_errors.items() if str(e.get("class_type", "")).startswith("EditLab")}
    loader = NEEDS_A_SAVED_FILE.get(name)
    for nid, e in list(ours.items()):
        if e["class_type"] == loader and all("file not found" in str(r.get("details")) for r in e["errors"]):
            del ours[nid]
    assert not ours, ours
    if name in SELF_CONTAINED:
        assert valid, (error, node_errors)
