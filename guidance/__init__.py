"""Pure-torch guidance (no ComfyUI imports): CFG combiners, attention control, token alignment, subjects."""
