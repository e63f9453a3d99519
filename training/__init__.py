"""Training methods (pure torch, no ComfyUI import): DreamBooth's pair sampling, loss and step loop."""
