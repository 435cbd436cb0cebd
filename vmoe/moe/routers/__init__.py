"""Router modules: logits -> scores -> Routing + auxiliary loss + metrics. Select one by name."""
from .base import ROUTERS, Router, RouterOutput, build_router, register_router
from .vmoe import NoisyTopKRouter

__all__ = ["ROUTERS", "Router", "RouterOutput", "build_router", "register_router", "NoisyTopKRouter"]
