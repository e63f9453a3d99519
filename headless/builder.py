"""Build UI-format workflows (the JSON the ComfyUI frontend saves) from a few lines of Python.

The example workflows in ``workflows/`` are generated with this, from the *loaded* node definitions,
so their ``widgets_values`` follow each node's real widget order (a public contract: widgets are only
ever appended). Regenerate with ``python -m <pack dir> build-workflows --comfyui PATH``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from .convert import _extra_values, _is_widget, ordered_inputs


@dataclass(frozen=True)
class Out:
    node: int
    slot: int
    type: str


class Graph:
    """A UI-format graph under construction. ``info`` maps class -> {input, output, output_name}."""

    COLUMN = 330

    def __init__(self, info: dict[str, dict]):
        self.info = info
        self.nodes: list[dict] = []
        self.links: list[list] = []
        self._col: dict[int, int] = {}

    def _place(self, column: int, height: int) -> list[int]:
        y = self._col.get(column, 40)
        self._col[column] = y + height + 40
        return [40 + column * self.COLUMN, y]

    def note(self, text: str, column: int = 0, title: str = "Read me", width: int = 420) -> None:
        nid = len(self.nodes) + 1
        height = 120 + 18 * text.count("\n")
        self.nodes.append({
            "id": nid, "type": "MarkdownNote", "title": title, "pos": self._place(column, height),
            "size": [width, height], "flags": {}, "order": nid - 1, "mode": 0, "inputs": [], "outputs": [],
            "properties": {}, "widgets_values": [text], "color": "#432", "bgcolor": "#653",
        })

    def add(self, class_type: str, column: int, title: Optional[str] = None, **kwargs: Any) -> tuple[Out, ...]:
        if class_type not in self.info:
            raise KeyError(f"unknown node type {class_type}")
        info = self.info[class_type]
        nid = len(self.nodes) + 1
        inputs, widgets = [], []
        for name, spec in ordered_inputs(info["input"]):
            value = kwargs.pop(name, None)
            if _is_widget(spec):
                if isinstance(value, Out):
                    link = self._link(value, nid, len(inputs))
                    inputs.append({"name": name, "type": _widget_type(spec), "widget": {"name": name}, "link": link})
                    value = _default(spec)
                widgets.append(_default(spec) if value is None else value)
                opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                if opts.get("control_after_generate"):
                    widgets.append("fixed")
                if _extra_values(spec) > (1 if opts.get("control_after_generate") else 0):
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
        height = 60 + 26 * (len(inputs) + len(widgets) + len(outputs))
        node = {
            "id": nid, "type": class_type, "pos": self._place(column, height), "size": [300, height],
            "flags": {}, "order": nid - 1, "mode": 0, "inputs": inputs, "outputs": outputs,
            "properties": {"Node name for S&R": class_type}, "widgets_values": widgets,
        }
        if title:
            node["title"] = title
        self.nodes.append(node)
        return tuple(Out(nid, slot, otype) for slot, otype in enumerate(info["output"]))

    def sample_decode(self, column: int, *, noise: Out, guider: Out, sampler: Out, sigmas: Out, latent: Out,
                      vae: Out, prefix: Optional[str] = None) -> tuple[Out, Out]:
        """SamplerCustomAdvanced -> VAEDecode (-> SaveImage with ``prefix``): the end of most example graphs.
        Returns the sampled LATENT and the decoded IMAGE."""
        out, _denoised = self.add("SamplerCustomAdvanced", column, noise=noise, guider=guider, sampler=sampler,
                                  sigmas=sigmas, latent_image=latent)
        (decoded,) = self.add("VAEDecode", column, samples=out, vae=vae)
        if prefix is not None:
            self.add("SaveImage", column, images=decoded, filename_prefix=prefix)
        return out, decoded

    def _link(self, src: Out, dst: int, dst_slot: int) -> int:
        link_id = len(self.links) + 1
        self.links.append([link_id, src.node, src.slot, dst, dst_slot, src.type])
        self.nodes[src.node - 1]["outputs"][src.slot]["links"].append(link_id)
        return link_id

    def to_json(self) -> dict:
        return {
            "last_node_id": len(self.nodes), "last_link_id": len(self.links),
            "nodes": self.nodes, "links": self.links, "groups": [], "config": {},
            "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4,
        }


def _widget_type(spec: Any) -> str:
    return "COMBO" if isinstance(spec[0], (list, tuple)) else spec[0]


def _default(spec: Any) -> Any:
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if "default" in opts:
        return opts["default"]
    if isinstance(spec[0], (list, tuple)):
        return spec[0][0] if spec[0] else None
    if spec[0] == "COMBO":
        options = opts.get("options") or []
        return options[0] if options else None
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(spec[0])
