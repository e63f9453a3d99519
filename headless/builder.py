"""Build UI-format workflows (the JSON the ComfyUI frontend saves) from a few lines of Python.

The example workflows in ``workflows/`` are generated with this, from the *loaded* node definitions,
so their ``widgets_values`` follow each node's real widget order (a public contract: widgets are only
ever appended). Regenerate with ``python -m editlab build-workflows --comfyui PATH``.

Layout: a graph reads left to right by stage. ``Graph(info, stages=[...])`` names the stage of each
column ("load", "invert", "edit", "decode and save"...); consecutive columns of one stage share a
ComfyUI group. The "Read me" note stands alone at the far left. Node sizes are at least what
ComfyUI's frontend draws (see ``node_size``), so the frontend never grows a node over its neighbour.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from .convert import extra_values, has_control, is_widget, ordered_inputs

# LiteGraph geometry (ComfyUI frontend 1.27): a node's title bar is drawn *above* pos[1]; a group's title
# bar (font 24) is inside its bounding box, at the top.
NODE_TITLE_HEIGHT = 30
GROUP_TITLE_HEIGHT = 34
GROUP_PADDING = 20
NODE_GAP = 24        # vertical space between one node's bottom and the next one's title bar
COLUMN_GAP = 50      # horizontal space between columns of one group (room for the links)
GROUP_GAP = 60       # horizontal space between groups
OUTPUT_PREVIEW_HEIGHT = 220  # room for the image / text an output node shows after a run
GROUP_COLORS = ("#3f789e", "#8A8", "#b58b2a", "#88A", "#a1309b", "#b06634")


@dataclass(frozen=True)
class Out:
    node: int
    slot: int
    type: str


def node_size(title: str, inputs: list[dict], widgets: list[Any], specs: dict[str, Any], n_outputs: int,
              output_node: bool = False) -> list[int]:
    """[width, height] (title bar excluded) at least as large as ComfyUI's frontend draws the node.

    Measured in the frontend (``node.computeSize()`` after ``app.loadGraphData``): the width grows with the
    title (~7.6 px per character at the 14 px title font); the height is ~20 px per socket row (an input
    and an output share a row), ~26 px per widget, a multiline text box needs more, and Load Image shows
    the picture under its widgets; an output node (Save Image, Preview Any) shows its result under its
    widgets after a run. Each term here is rounded up."""
    sockets = sum(1 for i in inputs if "widget" not in i)
    multiline = sum(1 for spec in specs.values() if is_widget(spec) and _opts(spec).get("multiline"))
    single = len(widgets) - multiline
    width = max(300, 30 + 8 * len(title))
    height = 10 + 22 * max(sockets, n_outputs) + 28 * single + 110 * multiline
    if any(_opts(spec).get("image_upload") for spec in specs.values()):
        height += 280  # the image preview under the upload button
    if output_node:
        height += OUTPUT_PREVIEW_HEIGHT
    return [int(width), int(height)]


def note_size(text: str, width: int) -> list[int]:
    """A Markdown note tall enough for its text at the frontend's note font (~7 px a character, 20 px lines)."""
    per_line = max(1, (width - 30) // 7)
    lines = sum(max(1, math.ceil(len(line) / per_line)) for line in text.split("\n"))
    headings = text.count("#")
    return [width, int(40 + 20 * lines + 12 * headings)]


class Graph:
    """A UI-format graph under construction. ``info`` maps class -> {input, output, output_name, display_name};
    ``stages[c]`` names the stage (the group) of column ``c``."""

    def __init__(self, info: dict[str, dict], stages: Sequence[str] = ()):
        self.info = info
        self.stages = list(stages)
        self.nodes: list[dict] = []
        self.links: list[list] = []
        self._columns: dict[int, list[dict]] = {}
        self._notes: list[dict] = []

    def note(self, text: str, title: str = "Read me", width: int = 460) -> None:
        """A Markdown note, in the lane left of the first stage."""
        nid = len(self.nodes) + 1
        node = {
            "id": nid, "type": "MarkdownNote", "title": title, "pos": [0, 0], "size": note_size(text, width),
            "flags": {}, "order": nid - 1, "mode": 0, "inputs": [], "outputs": [],
            "properties": {}, "widgets_values": [text], "color": "#432", "bgcolor": "#653",
        }
        self.nodes.append(node)
        self._notes.append(node)

    def add(self, class_type: str, column: int, title: Optional[str] = None, inputs: Optional[dict] = None,
            **kwargs: Any) -> tuple[Out, ...]:
        """Add a node; ``kwargs`` (and ``inputs``, for input names such as 'title' that clash with this method's
        own parameters) give widget values or connect sockets to outputs (``Out``)."""
        kwargs.update(inputs or {})
        if class_type not in self.info:
            raise KeyError(f"unknown node type {class_type}")
        if not 0 <= column < len(self.stages):
            raise ValueError(f"{class_type}: column {column} has no stage (stages: {self.stages})")
        info = self.info[class_type]
        nid = len(self.nodes) + 1
        inputs, widgets = [], []
        specs = dict(ordered_inputs(info["input"]))
        for name, spec in specs.items():
            value = kwargs.pop(name, None)
            if is_widget(spec):
                if isinstance(value, Out):
                    link = self._link(value, nid, len(inputs))
                    inputs.append({"name": name, "type": _widget_type(spec), "widget": {"name": name}, "link": link})
                    value = _default(spec)
                widgets.append(_default(spec) if value is None else value)
                if has_control(spec, name):
                    widgets.append("fixed")
                if extra_values(spec, name) > (1 if has_control(spec, name) else 0):
                    widgets.append("image")
            else:
                entry = {"name": name, "type": spec[0] if isinstance(spec[0], str) else "COMBO", "link": None}
                if isinstance(value, Out):
                    entry["link"] = self._link(value, nid, len(inputs))
                elif value is not None:
                    raise ValueError(f"{class_type}.{name} is a socket: connect an output, not {value!r}")
                inputs.append(entry)
        if kwargs:
            raise KeyError(f"{class_type} has no inputs {sorted(kwargs)}")
        outputs = []
        names = info.get("output_name") or info["output"]
        for slot, otype in enumerate(info["output"]):
            outputs.append({"name": names[slot], "type": otype, "links": [], "slot_index": slot})
        shown = title or info.get("display_name") or class_type  # the title the frontend draws
        size = node_size(shown, inputs, widgets, specs, len(outputs), bool(info.get("output_node")))
        node = {
            "id": nid, "type": class_type, "pos": [0, 0], "size": size,
            "flags": {}, "order": nid - 1, "mode": 0, "inputs": inputs, "outputs": outputs,
            "properties": {"Node name for S&R": class_type}, "widgets_values": widgets,
        }
        if title:
            node["title"] = title
        self.nodes.append(node)
        self._columns.setdefault(column, []).append(node)
        return tuple(Out(nid, slot, otype) for slot, otype in enumerate(info["output"]))

    def sample_decode(self, column: int, *, noise: Out, guider: Out, sampler: Out, sigmas: Out, latent: Out,
                      vae: Out, prefix: Optional[str] = None, decode_column: Optional[int] = None) -> tuple[Out, Out]:
        """SamplerCustomAdvanced (in ``column``) -> VAEDecode (-> SaveImage with ``prefix``; in ``decode_column``,
        default the same): the end of most example graphs. Returns the sampled LATENT and the decoded IMAGE."""
        out, _denoised = self.add("SamplerCustomAdvanced", column, noise=noise, guider=guider, sampler=sampler,
                                  sigmas=sigmas, latent_image=latent)
        column = column if decode_column is None else decode_column
        (decoded,) = self.add("VAEDecode", column, samples=out, vae=vae)
        if prefix is not None:
            self.add("SaveImage", column, images=decoded, filename_prefix=prefix)
        return out, decoded

    def _link(self, src: Out, dst: int, dst_slot: int) -> int:
        link_id = len(self.links) + 1
        self.links.append([link_id, src.node, src.slot, dst, dst_slot, src.type])
        self.nodes[src.node - 1]["outputs"][src.slot]["links"].append(link_id)
        return link_id

    def _layout(self) -> list[dict]:
        """Place the notes, then each stage's columns left to right; one group around each stage."""
        x, top = 0, 0
        for node in self._notes:
            node["pos"] = [x, top + NODE_TITLE_HEIGHT]
            top += node["size"][1] + NODE_TITLE_HEIGHT + NODE_GAP
        if self._notes:
            x += max(n["size"][0] for n in self._notes) + GROUP_GAP
        groups: list[dict] = []
        used = sorted(self._columns)
        spans: list[tuple[str, list[int]]] = []
        for column in used:
            if spans and spans[-1][0] == self.stages[column] and spans[-1][1][-1] == column - 1:
                spans[-1][1].append(column)
            else:
                spans.append((self.stages[column], [column]))
        for title, columns in spans:
            left, bottom = x, 0
            x += GROUP_PADDING
            for column in columns:
                y = GROUP_TITLE_HEIGHT + GROUP_PADDING
                nodes = self._columns[column]
                for node in nodes:
                    node["pos"] = [x, y + NODE_TITLE_HEIGHT]
                    y += NODE_TITLE_HEIGHT + node["size"][1] + NODE_GAP
                bottom = max(bottom, y - NODE_GAP)
                x += max(n["size"][0] for n in nodes) + COLUMN_GAP
            x += GROUP_PADDING - COLUMN_GAP
            groups.append({"id": len(groups) + 1, "title": title, "bounding": [left, 0, x - left, bottom + GROUP_PADDING],
                           "color": GROUP_COLORS[len(groups) % len(GROUP_COLORS)], "font_size": 24, "flags": {}})
            x += GROUP_GAP
        return groups

    def to_json(self) -> dict:
        groups = self._layout()
        return {
            "last_node_id": len(self.nodes), "last_link_id": len(self.links),
            "nodes": self.nodes, "links": self.links, "groups": groups, "config": {},
            "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4,
        }


def _opts(spec: Any) -> dict:
    return spec[1] if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict) else {}


def _widget_type(spec: Any) -> str:
    return "COMBO" if isinstance(spec[0], (list, tuple)) else spec[0]


def _default(spec: Any) -> Any:
    opts = _opts(spec)
    if "default" in opts:
        return opts["default"]
    if isinstance(spec[0], (list, tuple)):
        return spec[0][0] if spec[0] else None
    if spec[0] == "COMBO":
        options = opts.get("options") or []
        return options[0] if options else None
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(spec[0])
