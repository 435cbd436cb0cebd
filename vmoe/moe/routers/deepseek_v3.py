"""DeepSeek-V3 router: sigmoid affinity, auxiliary-loss-free bias balancing, sequence-wise balance loss,
group-limited routing."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ..losses import sequence_balance_loss
from ..checks import check_non_negative, check_positive_float
from ..settings import RoutingSettings
from ..routing import group_limited_top_k
from .base import Router, RouterOutput, register_router

__all__ = ["DeepSeekV3Router"]


@register_router("deepseek_v3")
class DeepSeekV3Router(Router):
    """s = sigmoid(x W^T) [G, S, E]; experts are chosen by the top-K of s + b (group-limited: only the
    ``topk_groups`` best of ``num_groups`` contiguous expert groups), combine weights are the chosen s
    normalised to sum to 1, times ``route_scale``. The bias b never enters the combine weights.

    Bias b (buffer ``expert_bias`` [E], persistent, in checkpoints): every training forward adds the
    number of choices per expert to a load accumulator; after each optimizer step (``on_optimizer_step``,
    called by the training loop once per step, so all micro-batches of a gradient-accumulation step
    count) b_i += gamma * sign(mean_load - load_i), then the accumulator is reset. Under
    torch.distributed the loads are summed over ranks first so every rank applies the same update.
    Loss: sequence_balance_weight * the sequence-wise balance loss, a sequence = one image (T tokens).
    """

    uses_sequence_length = True  # the block passes seq_len=T to forward

    def __init__(self, dim: int, num_experts: int, gamma: float = 1e-3, sequence_balance_weight: float = 1e-4,
                 num_groups: int = 1, topk_groups: int | None = None, route_scale: float = 1.0) -> None:
        super().__init__(num_experts, dim=dim)
        check_non_negative(**{"gamma (bias update speed)": gamma,
                                   "sequence_balance_weight": sequence_balance_weight})
        check_positive_float("route_scale", route_scale)
        topk_groups = num_groups if topk_groups is None else topk_groups
        group_limited_top_k(torch.zeros(1, num_experts), 1, num_groups, topk_groups)  # validates the groups
        self.gamma, self.sequence_balance_weight, self.route_scale = gamma, sequence_balance_weight, route_scale
        self.num_groups, self.topk_groups = num_groups, topk_groups
        self.register_buffer("expert_bias", torch.zeros(num_experts))
        # Integer so that model.to(dtype) never rounds the counts.
        self.register_buffer("load_since_step", torch.zeros(num_experts, dtype=torch.long), persistent=False)

    def check_settings(self, settings: RoutingSettings) -> None:
        super().check_settings(settings)
        group_limited_top_k(torch.zeros(1, self.num_experts), settings.k, self.num_groups, self.topk_groups)

    def forward(self, x: Tensor, settings: RoutingSettings, capacity: int, seq_len: int | None = None
                ) -> RouterOutput:
        """x: [G, S, D] -> routing [G, S, K]. seq_len: tokens per sequence (T); the G*S tokens are B*T
        consecutive tokens of B sequences. None treats every group as one sequence."""
        scores = self.logits(x).sigmoid()  # [G, S, E]
        biased = scores + self.expert_bias.float()
        _, expert_index = group_limited_top_k(biased, settings.k, self.num_groups, self.topk_groups)
        chosen = torch.gather(scores, -1, expert_index)
        weights = chosen / chosen.sum(-1, keepdim=True).clamp_min(1e-20) * self.route_scale
        routing = self.route(expert_index, weights, settings, capacity)
        if self.training:
            # Activation checkpointing may recount a forward; sign() of the relative load does not change.
            with torch.no_grad():
                # scatter-add, not bincount: compile-clean (no graph break) and deterministic on CUDA
                flat = expert_index.reshape(-1)
                self.load_since_step.scatter_add_(0, flat, torch.ones_like(flat))
        aux = scores.new_zeros(())
        metrics = {"expert_bias_absmax": self.expert_bias.abs().max().detach()}
        if self.sequence_balance_weight > 0:
            t = seq_len or x.shape[-2]
            if (x.shape[0] * x.shape[1]) % t:
                raise ValueError(f"seq_len={t} does not divide the {x.shape[0] * x.shape[1]} routed tokens")
            seq = sequence_balance_loss(scores.reshape(-1, t, self.num_experts),
                                        expert_index.reshape(-1, t, settings.k))
            aux = aux + self.sequence_balance_weight * seq
            metrics["sequence_balance_loss"] = seq.detach()
        return RouterOutput(routing, aux, metrics)

    @torch.no_grad()
    def on_optimizer_step(self) -> None:
        """b_i += gamma * sign(mean_load - load_i) from the load since the last step; resets the load."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.load_since_step)
        load = self.load_since_step.double()
        if load.sum() > 0 and self.gamma > 0:
            self.expert_bias += self.gamma * torch.sign(load.mean() - load).to(self.expert_bias.dtype)
        self.load_since_step.zero_()

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, gamma={self.gamma}, num_groups={self.num_groups}, "
                f"topk_groups={self.topk_groups}")
