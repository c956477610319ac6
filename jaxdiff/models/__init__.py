"""Flax NNX networks, architecture-compatible with the public diffusers / transformers checkpoints."""
