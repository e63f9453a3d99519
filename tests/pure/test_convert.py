"""UI -> API workflow conversion (the headless runner's front half), on synthetic node definitions."""
from __future__ import annotations

import pytest

from editlab.headless.convert import WorkflowError, apply_overrides, convert

DEFS = {
    "Loader": {"required": {"ckpt_name": [["a.safetensors", "b.safetensors"], {}]}},
    "Sampler": {
        "required": {
            "model": ["MODEL", {}],
            "seed": ["INT", {"default": 0, "control_after_generate": True}],
            "steps": ["INT", {"default": 20}],
            "sampler": ["COMBO", {"options": ["euler", "ddim"]}],
        },
        "optional": {"mask": ["MASK", {}], "strength": ["FLOAT", {"default": 1.0}]},
    },
    "LoadImage": {"required": {"image": [["x.png"], {"image_upload": True}]}},
    "Save": {"required": {"images": ["IMAGE", {}], "prefix": ["STRING", {"default": "out"}]}},
    "Filter": {"required": {"images": ["IMAGE", {}]}},
}


def node(nid, ntype, inputs=(), outputs=(), widgets=None, mode=0, title=None):
    n = {"id": nid, "type": ntype, "mode": mode, "inputs": list(inputs), "outputs": list(outputs),
         "widgets_values": [] if widgets is None else widgets}
    if title:
        n["title"] = title
    return n


def workflow():
    return {
        "nodes": [
            node(1, "Loader", outputs=[{"name": "MODEL", "type": "MODEL", "links": [1]}], widgets=["b.safetensors"]),
            node(2, "Reroute", inputs=[{"name": "", "type": "*", "link": 1}],
                 outputs=[{"name": "", "type": "MODEL", "links": [2]}]),
            node(3, "Sampler", inputs=[{"name": "model", "type": "MODEL", "link": 2},
                                       {"name": "steps", "type": "INT", "link": 3, "widget": {"name": "steps"}}],
                 widgets=[42, "randomize", 20, "ddim", 0.5], title="main sampler"),
            node(4, "PrimitiveNode", outputs=[{"name": "INT", "type": "INT", "links": [3],
                                               "widget": {"name": "steps"}}], widgets=[7, "fixed"]),
            node(5, "LoadImage", outputs=[{"name": "IMAGE", "type": "IMAGE", "links": [4]}], widgets=["x.png", "image"]),
            node(6, "Filter", inputs=[{"name": "images", "type": "IMAGE", "link": 4}],
                 outputs=[{"name": "IMAGE", "type": "IMAGE", "links": [5]}], mode=4),
            node(7, "Save", inputs=[{"name": "images", "type": "IMAGE", "link": 5}], widgets=["edit"]),
            node(8, "MarkdownNote", widgets=["# notes are dropped"]),
        ],
        "links": [[1, 1, 0, 2, 0, "MODEL"], [2, 2, 0, 3, 0, "MODEL"], [3, 4, 0, 3, 1, "INT"],
                  [4, 5, 0, 6, 0, "IMAGE"], [5, 6, 0, 7, 0, "IMAGE"]],
    }


def test_conversion_follows_widget_order_links_reroutes_primitives_and_bypass():
    prompt = convert(workflow(), DEFS)
    assert set(prompt) == {"1", "3", "5", "7"}  # reroute, primitive, bypassed node and note are gone
    assert prompt["1"]["inputs"] == {"ckpt_name": "b.safetensors"}
    # control_after_generate's hidden value ("randomize") is skipped; the primitive feeds 'steps'.
    assert prompt["3"]["inputs"] == {"model": ["1", 0], "seed": 42, "steps": 7, "sampler": "ddim", "strength": 0.5}
    assert prompt["3"]["_meta"]["title"] == "main sampler"
    assert prompt["5"]["inputs"] == {"image": "x.png"}  # the upload widget's value is skipped
    assert prompt["7"]["inputs"] == {"images": ["5", 0], "prefix": "edit"}  # bypass passes IMAGE through


def test_widget_values_may_be_a_dict():
    wf = {"nodes": [node(1, "Save", widgets={"prefix": "named"})], "links": []}
    assert convert(wf, DEFS)["1"]["inputs"] == {"prefix": "named"}


def test_unknown_node_types_are_named_in_the_error():
    wf = {"nodes": [node(9, "NotInstalled", title="mystery")], "links": []}
    with pytest.raises(WorkflowError, match=r"#9 NotInstalled \('mystery'\).*is its pack installed"):
        convert(wf, DEFS)


def test_missing_link_is_reported():
    wf = {"nodes": [node(1, "Save", inputs=[{"name": "images", "type": "IMAGE", "link": 99}], widgets=["p"])],
          "links": []}
    with pytest.raises(WorkflowError, match="link 99"):
        convert(wf, DEFS)


def test_api_format_passes_through_and_overrides_apply_by_id_title_or_type():
    prompt = convert(workflow(), DEFS)
    assert convert(prompt, DEFS) == prompt
    out = apply_overrides(prompt, ["main sampler.steps=3", "1.ckpt_name=a.safetensors", "Save.prefix=x"])
    assert out["3"]["inputs"]["steps"] == 3 and out["1"]["inputs"]["ckpt_name"] == "a.safetensors"
    assert out["7"]["inputs"]["prefix"] == "x"
    assert prompt["3"]["inputs"]["steps"] == 7  # the input prompt is not mutated
    with pytest.raises(WorkflowError, match="matches 0 nodes"):
        apply_overrides(prompt, ["nope.steps=1"])
    with pytest.raises(WorkflowError, match="node.input=value"):
        apply_overrides(prompt, ["steps3"])
