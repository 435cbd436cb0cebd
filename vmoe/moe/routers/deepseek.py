"""DeepSeekMoE router (Dai et al. 2024): softmax affinity, top-K', expert- and device-level balance.

Fine-grained segmentation and shared experts are properties of the MoE block (``expert_granularity``,
``num_shared_experts`` on :class:`vmoe.moe.MoEMlp`): the block hands this router E' = m*E routed experts
and K' = m*K choices.
"""
from __future__ import annotations

from torch import Tensor

from ..checks import check_non_negative
from ..settings import RoutingSettings
from ..losses import device_balance_loss, expert_balance_loss
from .base import Router, RouterOutput, register_router

__all__ = ["DeepSeekRouter"]


@register_router("deepseek")
class DeepSeekRouter(Router):
    """s = softmax(x W^T) over the E' routed experts; each token keeps its top-K' experts with their raw
    affinities as combine weights (not renormalised, as in DeepSeekMoE).

    Loss: expert_balance_weight * sum_i f_i P_i + device_balance_weight * sum_d f'_d P'_d, the experts
    split into ``num_devices`` contiguous groups for the device-level term (paper: 0.01 / 0.001 for the
    expert term, 0.05 for the device term at 145B; the device term needs num_devices >= 2).
    """

    uses_device_placement = True

    def __init__(self, dim: int, num_experts: int, expert_balance_weight: float = 0.01,
                 device_balance_weight: float = 0.0, num_devices: int | None = None) -> None:
        super().__init__(num_experts, dim=dim)
        check_non_negative(expert_balance_weight=expert_balance_weight,
                                device_balance_weight=device_balance_weight)
        if device_balance_weight > 0:
            if num_devices is None or num_devices < 2 or num_experts % num_devices:
                raise ValueError(f"device_balance_weight > 0 needs num_devices >= 2 dividing the "
                                 f"{num_experts} routed experts, got num_devices={num_devices}")
        elif num_devices is not None:
            raise ValueError(f"num_devices={num_devices} is only used by the device-level balance loss; "
                             "set device_balance_weight > 0 or drop num_devices")
        self.expert_balance_weight, self.device_balance_weight = expert_balance_weight, device_balance_weight
        self.num_devices = num_devices

    def forward(self, x: Tensor, settings: RoutingSettings, capacity: int) -> RouterOutput:
        """x: [G, S, D] -> routing [G, S, K']."""
        scores = self.logits(x).softmax(-1)  # [G, S, E']
        routing = self.route_top_k(scores, settings, capacity)
        expert = expert_balance_loss(scores, routing.expert_index)
        aux = self.expert_balance_weight * expert
        metrics = {"expert_balance_loss": expert.detach()}
        if self.device_balance_weight > 0:
            device = device_balance_loss(scores, routing.expert_index, self.num_devices)
            aux = aux + self.device_balance_weight * device
            metrics["device_balance_loss"] = device.detach()
        return RouterOutput(routing, aux, metrics)
