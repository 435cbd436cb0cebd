"""Sparse Mixture-of-Experts layers: capacity, routing, losses, routers, experts, dispatch.

Shapes in docstrings use the axis letters of :data:`vmoe.moe.axes.AXES`: B batch, T tokens per image,
G routing groups, S tokens per group, E experts, K choices per token, C capacity (slots per expert per
group), D model width, H expert hidden width, A kept assignments. docs/design.md explains the design.
"""
from . import axes, losses
from .mlp_base import MoEMlpBase
from .build import available_routers, build_moe_mlp, is_moe_mlp, iter_moe_mlps
from .capacity import compute_capacity, expert_choice_capacity
from .config import MoEConfig
from .dispatch_choice import build_dispatch
from .dispatch import (Dispatch, DispatchPrecision, combine_reference, moe_combine,
                       sort_assignments)
from .ensemble import EnsembleMoEMlp
from .experts import StackedExperts
from .layer import MoEMlp, routing_metrics
from .routers import ROUTERS, Router, RouterOutput, build_router, register_router, router_class
from .routing import Routing, expert_choice_routing, route_choices, top_k_routing
from .settings import V_MOE_CAPACITY_FACTOR, RoutingSettings
from .shared_experts import ResidualMLP, SharedExperts
from .soft import SoftMoEMlp
from .static_dispatch import StaticCapacityDispatch, static_slots

__all__ = [
    "axes", "losses", "MoEMlpBase", "MoEConfig", "RoutingSettings", "build_moe_mlp", "is_moe_mlp", "iter_moe_mlps", "compute_capacity", "expert_choice_capacity", "V_MOE_CAPACITY_FACTOR", "router_class", "combine_reference", "moe_combine", "sort_assignments", "StackedExperts",
    "MoEMlp", "routing_metrics", "ROUTERS", "Router", "RouterOutput", "build_router", "register_router",
    "Routing", "top_k_routing", "available_routers", "expert_choice_routing", "route_choices", "ResidualMLP",
    "SharedExperts", "SoftMoEMlp", "EnsembleMoEMlp", "Dispatch", "DispatchPrecision", "build_dispatch",
    "StaticCapacityDispatch", "static_slots",
]
