"""The shipped workflows as ComfyUI's frontend draws them: no overlapping nodes, stages in groups, thumbnails.

LiteGraph draws a node's title bar (30 px) above ``pos[1]`` and a group's title bar (font 24, ~34 px) at the
top of its bounding box. The frontend grows a node to its own minimum size (``node.computeSize()``), so
each stored size must be at least that: the minimum sizes below were measured in ComfyUI's frontend 1.27.10
(``app.loadGraphData`` of every shipped workflow, Load Image with its picture loaded).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted(p.stem for p in (ROOT / "workflows").glob("*.json"))
NODE_TITLE, GROUP_TITLE = 30, 34
NOTES = {"MarkdownNote", "Note"}

# Frontend minimum [width, height] (title bar excluded), by the title the UI shows; the widest of a class
# otherwise. A long title widens a node; widgets, multiline text and a loaded picture make it taller.
MEASURED_BY_TITLE = {
    "Known-Region Sampler (masked SDEdit / GLIDE inpaint)": (396, 194),
    "Subject Edit Pair (BLIP-Diffusion + Prompt-to-Prompt)": (373, 224),
    "Guider: a watercolor painting of a lake with a boat": (347, 166),
    "Edit: a watercolor painting of a lake with a boat": (329, 88),
    "Subject Encoder Loader (BLIP-Diffusion)": (293, 58),
    "Prompt Pair Encode (Prompt-to-Prompt)": (290, 282),
    "Attention Controller (Prompt-to-Prompt)": (284, 198),
    "Negative prompt (empty = the paper's)": (279, 88),
    "P2P Latent Batch (shared noise)": (242, 46),
}
MEASURED_BY_CLASS = {
    "LoadImage": (214, 326), "EditLabSDEditT0Search": (210, 350), "KSampler": (210, 262),
    "EditLabSubjectPrompt": (238, 254), "EditLabNullTextOptimize": (210, 242), "EditLabDualCFGCombiner": (210, 238),
    "EditLabInstructPix2PixEncode": (210, 226), "EditLabDDIMInvert": (210, 210), "ControlNetApplyAdvanced": (210, 186),
    "EditLabSDEPerturb": (210, 174), "EditLabInversionGuider": (270, 166), "EditLabReverseSDESampler": (238, 130),
    "EditLabReconstructionPSNR": (210, 118), "EditLabSaveInversion": (210, 112), "SamplerCustomAdvanced": (203, 106),
    "PreviewAny": (210, 88), "CLIPTextEncode": (262, 88), "EditLabAttentionMaps": (258, 78),
    "EditLabSubjectEncode": (240, 78), "SaveImage": (210, 58),
}


def _load(name: str) -> dict:
    return json.loads((ROOT / "workflows" / f"{name}.json").read_text(encoding="utf-8"))


def drawn_rect(node: dict) -> tuple[float, float, float, float]:
    """(x, y, w, h) of a node with its title bar, as LiteGraph draws it."""
    (x, y), (w, h) = node["pos"], node["size"]
    return x, y - NODE_TITLE, w, h + NODE_TITLE


def _overlap(a, b) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def _inside(rect, group) -> bool:
    gx, gy, gw, gh = group["bounding"]
    x, y, w, h = rect
    return gx <= x and x + w <= gx + gw and gy + GROUP_TITLE <= y and y + h <= gy + gh


def _title(node: dict) -> str:
    return node.get("title") or node["type"]


def overlapping_pairs(workflow: dict) -> list[str]:
    nodes = workflow["nodes"]
    return [f"{_title(a)} / {_title(b)}" for i, a in enumerate(nodes) for b in nodes[i + 1:]
            if _overlap(drawn_rect(a), drawn_rect(b))]


def group_problems(workflow: dict) -> list[str]:
    groups = workflow.get("groups") or []
    problems = []
    for node in workflow["nodes"]:
        rect = drawn_rect(node)
        holders = [g["title"] for g in groups if _inside(rect, g)]
        touched = [g["title"] for g in groups if _overlap(rect, g["bounding"])]
        if node["type"] in NOTES:
            if touched:
                problems.append(f"note '{_title(node)}' overlaps groups {touched}")
        elif len(holders) != 1 or touched != holders:
            problems.append(f"{_title(node)} lies inside {holders or 'no group'} and touches {touched}")
    return problems


@pytest.mark.parametrize("name", WORKFLOWS)
def test_no_two_nodes_overlap_title_bars_included(name):
    assert overlapping_pairs(_load(name)) == []


@pytest.mark.parametrize("name", WORKFLOWS)
def test_every_node_lies_inside_its_stage_group(name):
    workflow = _load(name)
    assert len(workflow.get("groups") or []) >= 3, "a workflow is laid out as stages (load ... decode and save)"
    assert group_problems(workflow) == []
    groups = workflow["groups"]
    assert not any(_overlap(a["bounding"], b["bounding"]) for i, a in enumerate(groups) for b in groups[i + 1:])


@pytest.mark.parametrize("name", WORKFLOWS)
def test_stages_read_left_to_right(name):
    """Every link runs rightwards or down one column: no link goes back to an earlier stage."""
    workflow = _load(name)
    nodes = {n["id"]: n for n in workflow["nodes"]}
    backwards = [f"{_title(nodes[src])} -> {_title(nodes[dst])}" for _id, src, _s, dst, _d, _t in workflow["links"]
                 if nodes[src]["pos"][0] > nodes[dst]["pos"][0]]
    assert backwards == []


@pytest.mark.parametrize("name", WORKFLOWS)
def test_node_sizes_are_at_least_what_the_frontend_draws(name):
    small = []
    for node in _load(name)["nodes"]:
        need = MEASURED_BY_TITLE.get(node.get("title", "")) or MEASURED_BY_CLASS.get(node["type"])
        if need and (node["size"][0] < need[0] or node["size"][1] < need[1]):
            small.append(f"{_title(node)} {node['size']} < {list(need)}")
    assert small == []


def test_every_workflow_has_a_small_jpeg_thumbnail():
    """The template browser shows workflows/<name>.jpg on each template's (square) card."""
    total = 0
    for name in WORKFLOWS:
        path = ROOT / "workflows" / f"{name}.jpg"
        assert path.is_file(), f"no thumbnail for {name}"
        with Image.open(path) as im:
            assert im.format == "JPEG" and im.size == (512, 512), (name, im.format, im.size)
            # a picture of a graph, not a blank placeholder: the frame has real contrast
            lo, hi = im.convert("L").getextrema()
            assert hi - lo > 100, name
        total += path.stat().st_size
    assert total < 1_000_000, f"thumbnails take {total} bytes; keep them small"


def test_builder_lays_columns_out_as_stage_groups():
    from editlab.headless.builder import Graph

    info = {
        "Src": {"input": {"required": {"n": ["INT", {"default": 1}]}}, "output": ["T"], "display_name": "Source"},
        "Dst": {"input": {"required": {"t": ["T", {}], "text": ["STRING", {"multiline": True}]}}, "output": [],
                "display_name": "A destination node with a rather long display name", "output_node": True},
    }
    g = Graph(info, stages=["load", "load", "use"])
    g.note("## hello\n" + "words " * 200)
    (a,) = g.add("Src", 0)
    (b,) = g.add("Src", 1, title="second")
    g.add("Dst", 2, t=a)
    g.add("Dst", 2, t=b)
    wf = g.to_json()
    assert [gr["title"] for gr in wf["groups"]] == ["load", "use"]  # equal neighbouring stages share a group
    assert overlapping_pairs(wf) == [] and group_problems(wf) == []
    note, *nodes = wf["nodes"]
    assert note["pos"][0] + note["size"][0] < min(n["pos"][0] for n in nodes)  # the note stands left of all
    assert note["size"][1] > 400  # tall enough for its text
    dst = wf["nodes"][3]
    assert dst["size"][0] >= 8 * len("A destination node with a rather long display name")  # the title fits
    with pytest.raises(ValueError, match="column 3 has no stage"):
        g.add("Src", 3)
