"""Sparse Mixture-of-Experts layers: capacity, routing, losses, routers, experts, dispatch."""
from . import losses
from .build import available_routers, build_moe_mlp, is_moe_layer, iter_moe_layers
from .capacity import compute_capacity
from .dispatch import (Dispatch, DispatchPrecision, build_dispatch, combine_reference, moe_combine,
                       sort_assignments)
from .ensemble import EnsembleMoEMlp
from .experts import StackedExperts
from .layer import MoEMlp, routing_metrics
from .routers import ROUTERS, Router, RouterOutput, build_router, register_router
from .routing import Routing, expert_choice_routing, route_choices, top_k_routing
from .shared_experts import ResidualMLP, SharedExperts
from .soft import SoftMoEMlp
from .static_dispatch import StaticCapacityDispatch, static_slots

__all__ = [
    "losses", "build_moe_mlp", "is_moe_layer", "iter_moe_layers", "compute_capacity", "combine_reference", "moe_combine", "sort_assignments", "StackedExperts",
    "MoEMlp", "routing_metrics", "ROUTERS", "Router", "RouterOutput", "build_router", "register_router",
    "Routing", "top_k_routing", "available_routers", "expert_choice_routing", "route_choices", "ResidualMLP",
    "SharedExperts", "SoftMoEMlp", "EnsembleMoEMlp", "Dispatch", "DispatchPrecision", "build_dispatch",
    "StaticCapacityDispatch", "static_slots",
]
