"""Checkpoint conversion: PyTorch-layout tensors (diffusers / transformers names) into Flax NNX modules."""
from jaxdiff.convert.torch_layout import CheckpointMismatchError as CheckpointMismatchError
from jaxdiff.convert.torch_layout import load_torch_tensors as load_torch_tensors
from jaxdiff.convert.torch_layout import torch_name_map as torch_name_map
