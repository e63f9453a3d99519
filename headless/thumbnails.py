"""Template-browser thumbnails: each example workflow as ComfyUI's real frontend draws it.

ComfyUI's template browser shows ``workflows/<name>.jpg`` next to ``workflows/<name>.json`` (a square
card). This script drives a *running* ComfyUI server over 127.0.0.1 with a headless browser: it loads each
workflow with ``app.loadGraphData``, hides the menus, fits the whole graph into a square view, screenshots
it and writes a small JPEG. Nothing of ComfyUI is copied; it needs ``playwright`` and a Chromium.

    python main.py --cpu --listen 127.0.0.1 --port 8199          # in the ComfyUI folder, with the pack installed
    python headless/thumbnails.py --url http://127.0.0.1:8199 [--chromium /usr/bin/chromium] [NAME ...]

Run it after ``build-workflows`` whenever a workflow's layout changes.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile

WORKFLOWS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "workflows")
VIEW = 1280          # px: the square part of the browser view the graph is fitted into
TOP = 60             # px above it, left to the workflow tabs (not in the picture)
SIZE, QUALITY = 512, 80
# Overlays that are not the graph: the canvas buttons and the minimap.
HIDE_CSS = ".p-buttongroup, [class*='minimap'] { visibility: hidden !important; }"

# Fit the graph (nodes with their title bars, and groups) into the view, filling its width or height.
_FIT = """([view, top, margin]) => {
  const g = window.app.graph, c = window.app.canvas;
  const boxes = g._nodes.map(n => [n.pos[0], n.pos[1] - 30, n.size[0], n.size[1] + 30])
    .concat((g._groups || []).map(gr => Array.from(gr._bounding || gr.bounding)));
  const x0 = Math.min(...boxes.map(b => b[0])), y0 = Math.min(...boxes.map(b => b[1]));
  const x1 = Math.max(...boxes.map(b => b[0] + b[2])), y1 = Math.max(...boxes.map(b => b[1] + b[3]));
  const scale = Math.min((view - 2 * margin) / (x1 - x0), (view - 2 * margin) / (y1 - y0));
  c.ds.scale = scale;
  c.ds.offset[0] = (view / scale - (x1 - x0)) / 2 - x0;
  c.ds.offset[1] = (view / scale - (y1 - y0)) / 2 - y0 + top / scale;
  c.show_info = false;           // the fps/info overlay (not saved to the user's settings)
  c.min_font_size_for_lod = 0;   // draw titles and widgets at any zoom, as at full size
  c.setDirty(true, true);
}"""


def render(url: str, names: list[str], chromium: str | None = None) -> list[str]:
    from PIL import Image
    from playwright.sync_api import sync_playwright

    written = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True)
        page = browser.new_page(viewport={"width": VIEW, "height": TOP + VIEW})
        page.goto(url, wait_until="networkidle")
        page.wait_for_function("window.app && window.app.graph && window.app.extensionManager", timeout=120_000)
        page.keyboard.press("Escape")  # the first-run template dialog
        page.evaluate("() => window.app.extensionManager.command.execute('Workspace.ToggleFocusMode')")
        page.add_style_tag(content=HIDE_CSS)
        for name in names:
            with open(os.path.join(WORKFLOWS, name + ".json"), encoding="utf-8") as fh:
                workflow = json.load(fh)
            page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", workflow)
            page.wait_for_timeout(1500)  # images in Load Image nodes, DOM widgets
            page.evaluate(_FIT, [VIEW, TOP, 16])
            page.wait_for_timeout(800)
            png = page.screenshot(clip={"x": 0, "y": TOP, "width": VIEW, "height": VIEW})
            shot = Image.open(io.BytesIO(png)).convert("RGB").resize((SIZE, SIZE), Image.LANCZOS)
            path = os.path.join(WORKFLOWS, name + ".jpg")
            fd, tmp = tempfile.mkstemp(suffix=".jpg", dir=WORKFLOWS)
            with os.fdopen(fd, "wb") as fh:
                shot.save(fh, "JPEG", quality=QUALITY, optimize=True)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
            written.append(path)
        browser.close()
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Render workflows/<name>.jpg with a running ComfyUI's frontend.")
    parser.add_argument("names", nargs="*", help="workflow names (default: every workflows/*.json)")
    parser.add_argument("--url", default="http://127.0.0.1:8188", help="the running ComfyUI server")
    parser.add_argument("--chromium", default=None, help="a Chromium executable (default: playwright's own)")
    args = parser.parse_args(argv)
    names = args.names or sorted(f[:-5] for f in os.listdir(WORKFLOWS) if f.endswith(".json"))
    for path in render(args.url, names, args.chromium):
        sys.stdout.write(path + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
