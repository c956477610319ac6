"""Checkpoint conversion: PyTorch-layout tensors (diffusers / transformers names) into Flax NNX modules.

Weights are read from safetensors only (lazily, memory-mapped); pickle checkpoints are refused. Original
(CompVis / Stability) SD 1.x / 2.x single files are renamed on the fly (:mod:`jaxdiff.convert.ldm`).
"""
from jaxdiff.convert.export import save_pretrained as save_pretrained
from jaxdiff.convert.export import torch_state_dict as torch_state_dict
from jaxdiff.convert.folders import MissingComponentsError as MissingComponentsError
from jaxdiff.convert.folders import NetworkSpec as NetworkSpec
from jaxdiff.convert.folders import PipelineFolder as PipelineFolder
from jaxdiff.convert.folders import REGISTRY as REGISTRY
from jaxdiff.convert.folders import build_network as build_network
from jaxdiff.convert.folders import find_weights as find_weights
from jaxdiff.convert.folders import load_component as load_component
from jaxdiff.convert.folders import load_model_folder as load_model_folder
from jaxdiff.convert.folders import load_single_file as load_single_file
from jaxdiff.convert.folders import missing_components as missing_components
from jaxdiff.convert.folders import read_component_config as read_component_config
from jaxdiff.convert.folders import read_model_index as read_model_index
from jaxdiff.convert.folders import require_components as require_components
from jaxdiff.convert.ldm import LDMNetworks as LDMNetworks
from jaxdiff.convert.ldm import load_ldm_checkpoint as load_ldm_checkpoint
from jaxdiff.convert.safetensors_io import PickleCheckpointError as PickleCheckpointError
from jaxdiff.convert.safetensors_io import SafetensorsError as SafetensorsError
from jaxdiff.convert.safetensors_io import SafetensorsFile as SafetensorsFile
from jaxdiff.convert.safetensors_io import ShardedSafetensors as ShardedSafetensors
from jaxdiff.convert.safetensors_io import open_safetensors as open_safetensors
from jaxdiff.convert.torch_layout import CheckpointMismatchError as CheckpointMismatchError
from jaxdiff.convert.torch_layout import abstract as abstract
from jaxdiff.convert.torch_layout import count_params as count_params
from jaxdiff.convert.torch_layout import load_torch_tensors as load_torch_tensors
from jaxdiff.convert.torch_layout import torch_name_map as torch_name_map
