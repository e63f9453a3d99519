"""UI-format workflow (what the ComfyUI frontend saves) -> API-format prompt (what the executor runs).

Pure: it needs only the node definitions (``{class_type: INPUT_TYPES()}``), so it is tested without
ComfyUI. Rules implemented (those of the frontend's graph-to-prompt):
- virtual nodes are dropped: notes (``Note``, ``MarkdownNote``), ``Reroute`` (links are followed through
  them), ``PrimitiveNode`` (its value is written into the widgets it feeds);
- muted nodes (mode 2) are dropped; bypassed nodes (mode 4) pass each input through to the output of
  the same type;
- ``widgets_values`` are positional over the node's widget inputs in definition order (required then
  optional), with one extra value after every widget that has ``control_after_generate`` and after
  image-upload combos; a dict ``widgets_values`` is read by name;
- a widget input fed by a link takes the link.
"""
from __future__ import annotations

from typing import Any, Iterable

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
VIRTUAL_NODES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
MODE_MUTED, MODE_BYPASSED = 2, 4


class WorkflowError(ValueError):
    """The workflow cannot be converted; the message names the node and the problem."""


def _is_widget(spec: Any) -> bool:
    if not isinstance(spec, (list, tuple)) or not spec:
        return False
    kind = spec[0]
    if isinstance(kind, (list, tuple)):
        return True  # legacy combo: the options list itself
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if opts.get("forceInput"):
        return False  # a socket only: no value in widgets_values
    return kind in WIDGET_TYPES


def _extra_values(spec: Any) -> int:
    """How many hidden frontend widgets follow this widget in ``widgets_values``."""
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    extra = 0
    if opts.get("control_after_generate"):
        extra += 1
    if opts.get("image_upload") or opts.get("video_upload") or opts.get("audio_upload"):
        extra += 1
    return extra


def ordered_inputs(definition: dict) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for section in ("required", "optional"):
        for name, spec in (definition.get(section) or {}).items():
            out.append((name, spec))
    return out


def _node_label(node: dict) -> str:
    title = node.get("title")
    return f"#{node.get('id')} {node.get('type')}" + (f" ('{title}')" if title else "")


def convert(workflow: dict, definitions: dict[str, dict]) -> dict[str, dict]:
    """Convert a UI-format workflow to an API-format prompt ``{id: {class_type, inputs, _meta}}``."""
    if "nodes" not in workflow or "links" not in workflow:
        if all(isinstance(v, dict) and "class_type" in v for v in workflow.values()):
            return workflow  # already API format
        raise WorkflowError("not a ComfyUI workflow: expected 'nodes' and 'links' (UI format) or an API-format prompt")
    nodes = {int(n["id"]): n for n in workflow["nodes"]}
    links: dict[int, tuple[int, int, str]] = {}
    for link in workflow["links"]:
        if isinstance(link, dict):
            links[int(link["id"])] = (int(link["origin_id"]), int(link["origin_slot"]), link.get("type", "*"))
        else:
            link_id, src, src_slot, _dst, _dst_slot, ltype = link[:6]
            links[int(link_id)] = (int(src), int(src_slot), ltype)

    def resolve(link_id: int, seen: frozenset = frozenset()) -> tuple[int, int] | None:
        """Follow a link back through reroutes and bypassed nodes to a real output."""
        if link_id not in links:
            raise WorkflowError(f"link {link_id} is referenced but missing from the workflow's 'links'")
        src, slot, ltype = links[link_id]
        node = nodes.get(src)
        if node is None:
            raise WorkflowError(f"link {link_id} starts at node {src}, which is not in the workflow")
        if src in seen:
            raise WorkflowError(f"reroute/bypass cycle through node {src}")
        if node["type"] == "Reroute" or node.get("mode") == MODE_BYPASSED:
            ins = node.get("inputs") or []
            candidates = [i for i in ins if i.get("link") is not None and
                          (node["type"] == "Reroute" or i.get("type") == ltype)]
            if not candidates:
                return None
            return resolve(int(candidates[0]["link"]), seen | {src})
        if node.get("mode") == MODE_MUTED:
            return None
        return (src, slot)

    # PrimitiveNode values: pushed into the widget they feed.
    primitive_values: dict[tuple[int, str], Any] = {}
    for node in nodes.values():
        if node["type"] != "PrimitiveNode":
            continue
        values = node.get("widgets_values") or []
        for out in node.get("outputs") or []:
            for link_id in out.get("links") or []:
                for other in nodes.values():
                    for inp in other.get("inputs") or []:
                        if inp.get("link") == link_id and inp.get("widget"):
                            primitive_values[(int(other["id"]), inp["widget"]["name"])] = values[0] if values else None

    prompt: dict[str, dict] = {}
    for nid, node in nodes.items():
        ntype = node["type"]
        if ntype in VIRTUAL_NODES or node.get("mode") in (MODE_MUTED, MODE_BYPASSED):
            continue
        if ntype not in definitions:
            raise WorkflowError(f"node {_node_label(node)}: unknown node type '{ntype}' (is its pack installed?)")
        by_name = {i["name"]: i for i in node.get("inputs") or []}
        wv = node.get("widgets_values")
        values: Iterable = iter(wv if isinstance(wv, list) else [])
        inputs: dict[str, Any] = {}
        for name, spec in ordered_inputs(definitions[ntype]):
            entry = by_name.get(name)
            link_id = entry.get("link") if entry else None
            if _is_widget(spec):
                if isinstance(wv, dict):
                    value = wv.get(name)
                else:
                    value = next(values, None)
                    for _ in range(_extra_values(spec)):
                        next(values, None)
                if (nid, name) in primitive_values:
                    value = primitive_values[(nid, name)]
                    link_id = None
                if link_id is not None:
                    src = resolve(int(link_id))
                    if src is not None:
                        inputs[name] = [str(src[0]), src[1]]
                        continue
                if value is not None:
                    inputs[name] = value
            elif link_id is not None:
                src = resolve(int(link_id))
                if src is not None:
                    inputs[name] = [str(src[0]), src[1]]
        prompt[str(nid)] = {"class_type": ntype, "inputs": inputs,
                            "_meta": {"title": node.get("title") or ntype}}
    return prompt


def apply_overrides(prompt: dict[str, dict], overrides: Iterable[str]) -> dict[str, dict]:
    """Apply ``node.input=value`` overrides; ``node`` is a node id, title or class type (unique)."""
    import json

    out = {k: {**v, "inputs": dict(v["inputs"])} for k, v in prompt.items()}
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise WorkflowError(f"--set expects node.input=value, got {item!r}")
        target, raw = item.split("=", 1)
        node_ref, input_name = target.rsplit(".", 1)
        matches = [k for k, v in out.items()
                   if node_ref in (k, v.get("_meta", {}).get("title"), v["class_type"])]
        if len(matches) != 1:
            raise WorkflowError(
                f"--set {item!r}: node '{node_ref}' matches {len(matches)} nodes; use the node id "
                f"(ids: {', '.join(sorted(out, key=lambda s: int(s) if s.isdigit() else 0))})"
            )
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        out[matches[0]]["inputs"][input_name] = value
    return out
