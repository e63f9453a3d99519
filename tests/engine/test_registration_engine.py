"""What ComfyUI shows for every EditLab node, as loaded by ComfyUI itself: the README promises a tooltip on
every input (widgets and sockets alike), and the house rules a tooltip on every output, a description on
every node and an ``EditLab`` id prefix."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _pack_nodes(engine) -> dict[str, type]:
    """Every node class ComfyUI registered from this pack's folder (found by source file, not by name)."""
    import inspect
    import os
    import nodes
    from editlab.nodes import node_list
    root = os.path.realpath(ROOT)
    found = {k: v for k, v in nodes.NODE_CLASS_MAPPINGS.items()
             if os.path.realpath(inspect.getfile(v)).startswith(root + os.sep)}
    assert sorted(found) == sorted(c.define_schema().node_id for c in node_list()), "registered != node_list()"
    return found


def test_every_node_id_is_prefixed_and_described(engine):
    found = _pack_nodes(engine)
    assert len(found) >= 20
    problems = []
    for node_id, cls in found.items():
        schema = cls.define_schema()
        if not node_id.startswith("EditLab"):
            problems.append(f"{node_id}: id not prefixed 'EditLab'")
        if not (schema.description or "").strip():
            problems.append(f"{node_id}: no description")
        if not (schema.display_name or "").strip():
            problems.append(f"{node_id}: no display name")
    assert not problems, problems


def test_every_input_and_output_has_a_tooltip(engine):
    problems = []
    for node_id, cls in _pack_nodes(engine).items():
        schema = cls.define_schema()
        for spec in schema.inputs:
            if not (spec.tooltip or "").strip():
                problems.append(f"{node_id}.{spec.id} ({spec.get_io_type()}): input without tooltip")
        for i, spec in enumerate(schema.outputs):
            if not (spec.tooltip or "").strip():
                problems.append(f"{node_id} output {i} ({spec.get_io_type()}): output without tooltip")
    assert not problems, "\n".join(problems)


def test_tooltips_reach_the_frontend_definition(engine):
    """The UI reads what /object_info serves (``GET_NODE_INFO_V1``): each input and output there has its tooltip."""
    problems = []
    for node_id, cls in _pack_nodes(engine).items():
        info = cls.GET_NODE_INFO_V1()
        for group in ("required", "optional"):
            for name, entry in (info["input"].get(group) or {}).items():
                opts = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
                if not opts.get("tooltip"):
                    problems.append(f"{node_id}.{name}")
        tips = info["output_tooltips"] or []
        if len(tips) != len(info["output"]) or not all(tips):
            problems.append(f"{node_id} outputs {tips}")
    assert not problems, problems


def test_the_runner_loads_the_core_nodes_that_import_the_server(engine):
    """Regression: ComfyUI's nodes.py puts comfy/ first on sys.path, so without main.py's early import of the
    utils/ package, comfy_extras files that import `server` (nodes_images: Image From Batch, Image Stitch) failed
    to import inside the headless runner and their nodes were silently missing from every headless run."""
    import nodes
    for name in ("ImageFromBatch", "ImageStitch", "PreviewAny", "StringReplace", "LoadImageSetFromFolderNode"):
        assert name in nodes.NODE_CLASS_MAPPINGS, f"core node {name} is not loaded in the headless runner"
