"""Pure-torch samplers (no ComfyUI imports): SDEdit perturbation and reverse SDE, inversion, null-text."""
