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
    with pytest.raises(WorkflowError, match="NODE.INPUT=VALUE"):
        apply_overrides(prompt, ["steps3"])


# --- regressions from the runner audit -------------------------------------------------------------------

NAMES = {"Sampler": "Main Sampler (display)", "Save": "Save Image"}


def test_a_misspelt_input_is_an_error_listing_the_nodes_inputs():
    prompt = convert(workflow(), DEFS)
    with pytest.raises(WorkflowError, match=r"#3 Sampler \('main sampler'\) has no input 't00'; its inputs: model, "
                                            r"seed, steps, sampler, mask, strength\.$"):
        apply_overrides(prompt, ["3.t00=4"], DEFS)
    with pytest.raises(WorkflowError, match=r"has no input 'stpes'.* Did you mean 'steps'\?"):
        apply_overrides(prompt, ["main sampler.stpes=4"], DEFS)
    # without definitions the inputs the prompt has are the known ones: still an error, never ignored
    with pytest.raises(WorkflowError, match=r"#7 Save has no input 'prefx'; its inputs: images, prefix"):
        apply_overrides(prompt, ["Save.prefx=x"])
    # an optional input the workflow left unset is still a valid target
    assert apply_overrides(prompt, ["3.mask=[\"5\", 1]"], DEFS)["3"]["inputs"]["mask"] == ["5", 1]


def test_nodes_are_named_by_the_title_the_ui_shows():
    """The frontend shows a node's own title, else its class's display name; --set accepts both, and the
    API prompt's _meta.title is what the UI shows."""
    prompt = convert(workflow(), DEFS, NAMES)
    assert prompt["7"]["_meta"]["title"] == "Save Image"          # untitled: the display name
    assert prompt["3"]["_meta"]["title"] == "main sampler"        # titled: its own title
    out = apply_overrides(prompt, ["Save Image.prefix=shown", "main sampler.steps=9"], DEFS, NAMES)
    assert out["7"]["inputs"]["prefix"] == "shown" and out["3"]["inputs"]["steps"] == 9
    # a class's display name also names its node when the node has a title of its own
    assert apply_overrides(prompt, ["Main Sampler (display).seed=5"], DEFS, NAMES)["3"]["inputs"]["seed"] == 5


def test_titles_with_dots_and_equals_signs_are_addressable():
    wf = workflow()
    wf["nodes"][6]["title"] = "row s_I = 1.5"
    prompt = convert(wf, DEFS)
    out = apply_overrides(prompt, ["row s_I = 1.5.prefix=a=b"], DEFS)
    assert out["7"]["inputs"]["prefix"] == "a=b"


def test_ambiguous_node_lists_the_matching_nodes():
    wf = workflow()
    wf["nodes"].append(node(9, "Save", inputs=[{"name": "images", "type": "IMAGE", "link": 4}], widgets=["p"]))
    with pytest.raises(WorkflowError, match=r"matches 2 nodes.*#7 Save, #9 Save"):
        apply_overrides(convert(wf, DEFS), ["Save.prefix=x"], DEFS)


def test_builder_uses_public_shared_helpers():
    """builder.py and convert.py share the widget rules through public names (no private imports)."""
    import ast
    from pathlib import Path

    from editlab.headless import convert as conv
    root = Path(__file__).resolve().parents[2] / "headless"
    for name in ("builder.py", "runner.py"):
        tree = ast.parse((root / name).read_text(encoding="utf-8"))
        private = [a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names
                   if a.name.startswith("_")]
        assert private == [], f"{name} imports private names {private}"
    assert conv.is_widget(["INT", {}]) and not conv.is_widget(["INT", {"forceInput": True}])
    assert conv.extra_values(["INT", {"control_after_generate": True}]) == 1


def test_error_lines_name_the_pack_not_its_absolute_path(monkeypatch):
    """ComfyUI names a pack's modules after its absolute path; error lines show the pack folder's name."""
    import sys
    import types

    from editlab.headless import runner
    module = "/home/someone/ComfyUI/custom_nodes/editlab.errors"
    monkeypatch.setitem(sys.modules, module, types.ModuleType("errors"))
    line = runner.pack_relative(f"node #4 EditLabX failed: {module}.EditLabError: bad mask")
    assert line == "node #4 EditLabX failed: editlab.errors.EditLabError: bad mask"
    # file paths in messages are the user's information: untouched
    assert runner.pack_relative("searched /opt/ComfyUI/models/checkpoints") == "searched /opt/ComfyUI/models/checkpoints"


def test_runner_notifications_are_bounded():
    from editlab.headless import runner
    server = runner._Server()
    for i in range(runner.MAX_MESSAGES + 50):
        server.send_sync("progress", {"value": i})
    assert len(server.messages) == runner.MAX_MESSAGES and server.messages[-1][1]["value"] == runner.MAX_MESSAGES + 49


def test_relative_workflow_paths_are_found_in_the_pack(tmp_path, monkeypatch):
    from editlab.headless import runner
    monkeypatch.chdir(tmp_path)
    name = "workflows/SDEdit - stroke painting to image.json"
    assert runner.find_workflow(name) == runner.os.path.join(runner.PACK_DIR, name)
    (tmp_path / "mine.json").write_text("{}")
    assert runner.find_workflow("mine.json") == "mine.json"  # the working directory comes first
    with pytest.raises(runner.RunError, match="workflow file not found: nope.json .looked in"):
        runner.find_workflow("nope.json")


def test_cli_subcommands_are_a_registry(monkeypatch, capsys):
    """A subcommand is one SUBCOMMANDS entry (the batch helper adds `batch` this way)."""
    from editlab.headless import runner
    seen = {}

    def add(parser):
        parser.add_argument("--n", type=int, default=1)

    def handler(args):
        seen["n"] = args.n
        return 7

    monkeypatch.setitem(runner.SUBCOMMANDS, "probe", ("a test subcommand", add, handler))
    assert runner.main(["probe", "--n", "3"]) == 7 and seen == {"n": 3}
    assert {"run", "build-workflows"} <= set(runner.SUBCOMMANDS)


def test_seed_named_widgets_carry_the_frontends_control_value():
    """Regression: ComfyUI's frontend adds a 'control after generate' widget to every input named seed /
    noise_seed, flag or not (its widgets_values count: ``control_after_generate || ["seed", "noise_seed"]``).
    DreamBooth Train's seed had no flag, so the builder wrote one value fewer than the frontend reads and the
    frontend shifted save_every onto 'dreambooth' (the checkpoint name): the queued workflow failed to validate."""
    from editlab.headless import convert as conv
    from editlab.headless.builder import Graph
    assert conv.extra_values(["INT", {}], "seed") == 1 and conv.extra_values(["INT", {}], "noise_seed") == 1
    assert conv.extra_values(["INT", {}], "steps") == 0
    info = {"N": {"input": {"required": {"seed": ["INT", {"default": 0}], "save_every": ["INT", {"default": 0}],
                                         "name": ["STRING", {"default": "dreambooth"}]}},
                  "output": [], "output_name": [], "display_name": "N"}}
    g = Graph(info, stages=["s"])
    g.add("N", 0, seed=5, save_every=10, name="x")
    wf = g.to_json()
    assert wf["nodes"][0]["widgets_values"] == [5, "fixed", 10, "x"]
    api = convert(wf, {"N": info["N"]["input"]})
    assert api["1"]["inputs"] == {"seed": 5, "save_every": 10, "name": "x"}
