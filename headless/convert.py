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

import difflib
import json
from typing import Any, Iterable, Optional

from ..errors import EditLabError

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
VIRTUAL_NODES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
MODE_MUTED, MODE_BYPASSED = 2, 4


class WorkflowError(EditLabError):
    """The workflow cannot be converted; the message names the node and the problem."""


def is_widget(spec: Any) -> bool:
    """Whether an input spec (``INPUT_TYPES`` entry) is a widget, i.e. has a value in ``widgets_values``."""
    if not isinstance(spec, (list, tuple)) or not spec:
        return False
    kind = spec[0]
    if isinstance(kind, (list, tuple)):
        return True  # legacy combo: the options list itself
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if opts.get("forceInput"):
        return False  # a socket only: no value in widgets_values
    return kind in WIDGET_TYPES


SEED_NAMES = ("seed", "noise_seed")  # the frontend gives these a control widget whatever the spec says


def has_control(spec: Any, name: str = "") -> bool:
    """Whether the frontend adds a 'control after generate' widget (and value) after this widget: the spec asks
    for it, or the input is named seed / noise_seed (ComfyUI's frontend always adds one for those names)."""
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return bool(opts.get("control_after_generate")) or name in SEED_NAMES


def extra_values(spec: Any, name: str = "") -> int:
    """How many hidden frontend widgets follow this widget (named ``name``) in ``widgets_values``."""
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    extra = 0
    if has_control(spec, name):
        extra += 1
    if opts.get("image_upload") or opts.get("video_upload") or opts.get("audio_upload"):
        extra += 1
    return extra


# The former private names (headless/batch.py still imports them).
_is_widget, _extra_values = is_widget, extra_values


def ordered_inputs(definition: dict) -> list[tuple[str, Any]]:
    """A node's inputs in definition order (required, then optional): the order of ``widgets_values``."""
    out: list[tuple[str, Any]] = []
    for section in ("required", "optional"):
        for name, spec in (definition.get(section) or {}).items():
            out.append((name, spec))
    return out


def _node_label(node: dict) -> str:
    title = node.get("title")
    return f"#{node.get('id')} {node.get('type')}" + (f" ('{title}')" if title else "")


def convert(workflow: dict, definitions: dict[str, dict],
            display_names: Optional[dict[str, str]] = None) -> dict[str, dict]:
    """Convert a UI-format workflow to an API-format prompt ``{id: {class_type, inputs, _meta}}``.

    ``_meta.title`` is what the UI shows on the node, as the frontend writes it: the node's own title,
    else its class's display name (``display_names``), else the class type."""
    display_names = display_names or {}
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
            if is_widget(spec):
                if isinstance(wv, dict):
                    value = wv.get(name)
                else:
                    value = next(values, None)
                    for _ in range(extra_values(spec, name)):
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
                            "_meta": {"title": node.get("title") or display_names.get(ntype) or ntype}}
    return prompt


def _label(nid: str, node: dict) -> str:
    title = node.get("_meta", {}).get("title")
    return f"#{nid} {node['class_type']}" + (f" ('{title}')" if title and title != node["class_type"] else "")


def _sorted_ids(prompt: dict) -> list[str]:
    return sorted(prompt, key=lambda s: (0, int(s)) if s.isdigit() else (1, s))


def find_nodes(prompt: dict[str, dict], ref: str, display_names: Optional[dict[str, str]] = None) -> list[str]:
    """Ids of the nodes ``ref`` names: a node id, the title the UI shows, a class type or its display name."""
    names = display_names or {}
    return [k for k in _sorted_ids(prompt)
            if ref in (k, prompt[k].get("_meta", {}).get("title"), prompt[k]["class_type"],
                       names.get(prompt[k]["class_type"]))]


def _split_override(item: str, prompt: dict, display_names: Optional[dict[str, str]]) -> tuple[str, str, str]:
    """``NODE.INPUT=VALUE`` -> (node ref, input, raw value). A title may hold '.' or '=' (``row s_I = 1.0``):
    the first '=' whose left side names a node wins; without one, the first '='."""
    splits = []
    for i, ch in enumerate(item):
        if ch == "=" and "." in item[:i]:
            node_ref, input_name = item[:i].rsplit(".", 1)
            splits.append((node_ref, input_name, item[i + 1:]))
    if not splits:
        raise WorkflowError(f"--set expects NODE.INPUT=VALUE, got {item!r}")
    for split in splits:
        if len(find_nodes(prompt, split[0], display_names)) == 1:
            return split
    return splits[0]


def apply_overrides(prompt: dict[str, dict], overrides: Iterable[str], definitions: Optional[dict[str, dict]] = None,
                    display_names: Optional[dict[str, str]] = None) -> dict[str, dict]:
    """Apply ``NODE.INPUT=VALUE`` overrides to a copy of ``prompt``.

    NODE is a node id, the title the UI shows, or a class type / display name that only one node has. INPUT
    must be one of the node's inputs (from ``definitions`` when given, else the inputs the prompt already has):
    a misspelt input is an error listing them, never silently ignored. VALUE is JSON, else text."""
    out = {k: {**v, "inputs": dict(v["inputs"])} for k, v in prompt.items()}
    for item in overrides:
        node_ref, input_name, raw = _split_override(item, out, display_names)
        matches = find_nodes(out, node_ref, display_names)
        if len(matches) != 1:
            nodes = ", ".join(_label(k, out[k]) for k in (matches or _sorted_ids(out)))
            raise WorkflowError(f"--set {item!r}: node '{node_ref}' matches {len(matches)} nodes; name it by id, "
                                f"the title the UI shows, or a class type only one node has ("
                                f"{'matching' if matches else 'nodes'}: {nodes})")
        nid = matches[0]
        ctype = out[nid]["class_type"]
        if definitions is not None and ctype in definitions:
            known = [name for name, _spec in ordered_inputs(definitions[ctype])]
        else:
            known = list(out[nid]["inputs"])
        if input_name not in known:
            close = difflib.get_close_matches(input_name, known, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise WorkflowError(f"--set {item!r}: node {_label(nid, out[nid])} has no input '{input_name}'; "
                                f"its inputs: {', '.join(known) or '(none)'}.{hint}")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        out[nid]["inputs"][input_name] = value
    return out
