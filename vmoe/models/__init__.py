"""timm integration: V-MoE models from timm ViTs, registry names, upcycling, checkpoints, routing helpers.

Importing the package registers the timm names (:mod:`.timm_names`); every other name below is imported from
its module on first use.
"""
from ..lazy import lazy_names
from . import timm_names  # noqa: F401  (registers the vmoe timm names)

_NAMES = {
    **dict.fromkeys(["create_vmoe", "convert_to_moe", "parse_moe_layers", "mlp_config", "upcycle"], "vmoe.models.build"),
    **dict.fromkeys(["save_weights", "load_weights", "read_checkpoint", "read_state_dict", "extract_state_dict",
                     "check_state_dict"], "vmoe.models.checkpoint"),
    **dict.fromkeys(["EnsembleVisionTransformer", "to_ensemble"], "vmoe.models.ensemble"),
    **dict.fromkeys(["ModelCost", "model_cost", "flops_table"], "vmoe.models.flops"),
    **dict.fromkeys(["read_reference_checkpoint", "infer_architecture", "load_reference"],
                    "vmoe.models.jax_checkpoint"),
    "save_pretrained": "vmoe.models.hub",
    **dict.fromkeys(["TIMM_NAMES", "UPCYCLE_FROM"], "vmoe.models.timm_names"),
    **dict.fromkeys(["block_index", "moe_block_indices", "moe_mlps_by_block", "aux_loss", "set_routing",
                     "routing_settings", "capture_routing"], "vmoe.models.moe_mlps"),
    "upcycle_state_dict": "vmoe.models.upcycle_weights",
}
__all__ = list(_NAMES)
__getattr__, __dir__ = lazy_names(__name__, _NAMES)
