"""Router modules: logits -> scores -> Routing + auxiliary loss + metrics. Select one by name."""
from .base import ROUTERS, Router, RouterOutput, after_optimizer_step, build_router, float32_logits, register_router
from .vmoe import NoisyTopKRouter

__all__ = ["ROUTERS", "Router", "RouterOutput", "after_optimizer_step", "build_router", "float32_logits",
           "register_router", "NoisyTopKRouter"]
