"""The JAX V-MoE reference's checkpoints: read them, infer their architecture, rebuild them exactly."""
from .architecture import ReferenceArchitecture, infer_architecture
from .convert import reference_state_dict
from .model import build_reference_model, load_reference, reference_model_config
from .reader import (ArrayInfo, ReferenceCheckpointError, read_reference_checkpoint, read_reference_index,
                     resolve_checkpoint_prefix)

__all__ = ["read_reference_checkpoint", "read_reference_index", "ArrayInfo", "ReferenceCheckpointError",
           "ReferenceArchitecture", "infer_architecture", "reference_state_dict", "build_reference_model",
           "load_reference", "reference_model_config", "resolve_checkpoint_prefix"]
