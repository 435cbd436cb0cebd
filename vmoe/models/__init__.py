"""timm integration: V-MoE models from timm ViTs, registry names, upcycling, checkpoints, routing helpers."""
from . import paper, registry, vit_prelogits  # noqa: F401  (registers the vmoe_* names with timm)
from .build import convert_to_moe, create_vmoe, mlp_config, parse_moe_layers, upcycle
from .checkpoint import (check_state_dict, extract_state_dict, load_weights, read_checkpoint, read_state_dict,
                         save_weights)
from .ensemble import EnsembleVisionTransformer, to_ensemble
from .flops import ModelCost, flops_table, model_cost
from .jax_checkpoint import infer_architecture, load_reference, read_reference_checkpoint
from .hub import save_pretrained  # also registers the generic "vmoe" timm name
from .registry import UPCYCLE_FROM, VMOE_MODELS
from .moe_layers import (aux_loss, block_index, capture_routing, moe_block_indices, moe_layers_by_block,
                         routing_settings, set_routing)
from .upcycle import upcycle_state_dict

__all__ = [
    "create_vmoe", "convert_to_moe", "parse_moe_layers", "mlp_config", "upcycle", "upcycle_state_dict",
    "save_weights", "load_weights", "read_checkpoint", "read_state_dict", "extract_state_dict", "check_state_dict",
    "block_index", "moe_block_indices", "moe_layers_by_block", "aux_loss", "set_routing", "routing_settings",
    "capture_routing",
    "ModelCost", "model_cost", "flops_table", "VMOE_MODELS", "UPCYCLE_FROM",
    "read_reference_checkpoint", "infer_architecture", "load_reference", "EnsembleVisionTransformer", "to_ensemble", "save_pretrained",
]
