"""Router modules: logits -> scores -> Routing + auxiliary loss + metrics. Select one by name."""
from .base import (ROUTERS, Router, RouterOutput, after_optimizer_step, build_router, float32_logits,
                   register_router, router_class)
from .deepseek import DeepSeekRouter
from .deepseek_v3 import DeepSeekV3Router
from .dense import DenseRouter
from .ensemble import EnsembleRouter
from .expert_choice import ExpertChoiceRouter
from .gshard import GShardRouter
from .mixtral import MixtralRouter
from .shazeer import ShazeerRouter
from .switch import SwitchRouter
from .vmoe import NoisyTopKRouter

__all__ = ["ROUTERS", "Router", "RouterOutput", "after_optimizer_step", "build_router", "float32_logits",
           "register_router", "router_class", "NoisyTopKRouter", "DeepSeekRouter", "DeepSeekV3Router", "DenseRouter", "EnsembleRouter",
           "ExpertChoiceRouter", "GShardRouter", "MixtralRouter", "ShazeerRouter", "SwitchRouter"]
