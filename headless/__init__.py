"""Headless execution of workflows on ComfyUI's own engine (runner) and UI->API conversion (convert)."""
