"""The sparse MoE block: a drop-in for timm's Mlp (docs/design.md)."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .mlp_base import MoEMlpBase
from .capacity import compute_capacity, expert_choice_capacity
from .checks import check_positive_int
from .dispatch import Dispatch, DispatchPrecision
from .dispatch_choice import build_dispatch
from .experts import StackedExperts
from .routers import Router, build_router, router_class
from .routing import Routing
from .settings import RoutingSettings, resolve_settings, settings_from_arguments
from .shared_experts import ResidualMLP, SharedExperts, fine_grained

__all__ = ["MoEMlp"]


class MoEMlp(MoEMlpBase):
    """Sparse mixture of expert MLPs, constructed like ``timm.layers.Mlp`` plus the MoE settings.

    Tokens of the input [B, T, D] are split into routing groups of ``group_size`` consecutive tokens
    (None: all B*T tokens form one group); the router picks K experts per token with per-expert
    capacity, each expert runs on its kept tokens, and the outputs are combined with the gate weights.
    A token that loses every choice gets 0 here, so only the block's residual carries it.

    After each forward: ``aux_loss`` (weighted, in the graph), ``metrics`` (detached: tokens_per_expert [E],
    dropped_fraction, dropped_tokens_fraction, load_cv) and ``last_routing`` (a Routing shaped [B, T, K]).
    State-dict keys: router.weight [E, D], experts.fc{1,2}_{weight,bias}.

    Routing: ``settings`` (a :class:`RoutingSettings`) or the same fields as keywords (k, capacity_factor,
    eval_capacity_factor, batch_priority, noise_std, group_size, bfloat16_dispatch), never both. Unset
    fields take the scheme's defaults (``Router.default_settings``); a scheme refuses a setting it does not
    use. ``block.settings`` holds the resolved settings. importance_weight, load_weight: None = the
    router's own loss weights.
    Expert structure (any top-k router): ``expert_granularity`` m segments every expert into m of hidden
    H/m and routes m*K of the m*E (DeepSeekMoE; ``num_experts``/``k`` then report m*E/m*K);
    ``num_shared_experts`` K_s adds K_s always-on experts of hidden H/m (``shared_experts``);
    ``residual`` adds a dense MLP of hidden H to the MoE output (DeepSpeed residual MoE, ``residual``),
    ``residual_coefficient`` mixes the two with a learned per-token softmax (DeepSpeed's code).
    ``bfloat16_dispatch`` rounds each expert's input and output to bfloat16 (the V-MoE reference's
    ``dispatcher.bfloat16``; ``DispatchPrecision(round_to=torch.bfloat16)`` of every dispatch strategy); the
    combine weights and the sum over choices stay in the input's dtype.

    ``dispatch``: how tokens reach the experts, a :mod:`vmoe.moe.dispatch` strategy or its name: "auto"
    (static-capacity buffers under torch.compile/export and on GPU, sorted blocks on CPU eager), "sorted",
    "static" or "reference" (the plain per-expert loop). ``moe.dispatch = "static"`` switches it later.
    """

    supports_expert_parallel = True

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: type[nn.Module] = nn.GELU,
        norm_layer: type[nn.Module] | None = None,
        bias: bool = True,
        drop: float = 0.0,
        use_conv: bool = False,
        *,
        num_experts: int = 8,
        settings: RoutingSettings | None = None,
        k: int | None = None,
        capacity_factor: float | None = None,
        eval_capacity_factor: float | None = None,
        batch_priority: bool = False,
        noise_std: float | None = None,
        group_size: int | None = None,
        bfloat16_dispatch: bool = False,
        importance_weight: float | None = None,
        load_weight: float | None = None,
        router: str = "vmoe",
        router_kwargs: dict[str, Any] | None = None,
        expert_granularity: int = 1,
        num_shared_experts: int = 0,
        residual: bool = False,
        residual_coefficient: bool = False,
        dispatch: str | Dispatch = "auto",
    ) -> None:
        if norm_layer is not None or use_conv:
            raise ValueError("MoEMlp supports neither norm_layer nor use_conv (timm Mlp options); got "
                             f"norm_layer={norm_layer}, use_conv={use_conv}")
        check_positive_int("num_experts", num_experts)
        if num_shared_experts < 0:
            raise ValueError(f"num_shared_experts must be >= 0, got {num_shared_experts}")
        if residual_coefficient and not residual:
            raise ValueError("residual_coefficient=True needs residual=True (it mixes the dense MLP and the MoE)")
        given = settings_from_arguments(settings, k=k, capacity_factor=capacity_factor,
                                        eval_capacity_factor=eval_capacity_factor, batch_priority=batch_priority,
                                        noise_std=noise_std, group_size=group_size,
                                        bfloat16_dispatch=bfloat16_dispatch)
        scheme = router_class(router)
        resolved = resolve_settings(given, router, scheme.default_settings(num_experts), scheme.settings_used)
        hidden_features = hidden_features or in_features
        routed = fine_grained(router, "k" in scheme.settings_used, num_experts, resolved.k, hidden_features,
                              expert_granularity)
        super().__init__(in_features, routed.num_experts)
        losses = {name: value for name, value in dict(importance_weight=importance_weight,
                                                      load_weight=load_weight).items() if value is not None}
        clash = sorted(set(losses) & set(router_kwargs or {}))
        if clash:
            raise ValueError(f"{clash} given both as MoEMlp arguments and in router_kwargs; give each once")
        self.router: Router = build_router(router, dim=in_features, num_experts=routed.num_experts,
                                           **losses, **(router_kwargs or {}))
        self.expert_granularity = expert_granularity
        self.experts = StackedExperts(routed.num_experts, in_features, routed.hidden_features, out_features,
                                      act_layer, bias, drop)
        self.shared_experts = SharedExperts(num_shared_experts, in_features, routed.hidden_features,
                                            out_features, act_layer, bias, drop) if num_shared_experts else None
        self.residual = ResidualMLP(in_features, hidden_features, out_features, act_layer, bias, drop,
                                    residual_coefficient) if residual else None
        self._router_takes_seq_len = self.router.uses_sequence_length
        self._dispatch = build_dispatch(dispatch, DispatchPrecision())
        self.settings = resolved.replace(k=routed.k)

    @property
    def dispatch(self) -> Dispatch:
        """The dispatch strategy; set it by name or as a :class:`vmoe.moe.dispatch.Dispatch`."""
        return self._dispatch

    @dispatch.setter
    def dispatch(self, value: str | Dispatch) -> None:
        self._dispatch = build_dispatch(value, self._dispatch.precision)

    def check_settings(self, settings: RoutingSettings) -> None:
        if settings.capacity_factor is None:
            raise ValueError(f"capacity_factor must be > 0 for router {type(self.router).__name__}, got None")
        self.router.check_settings(settings)

    def settings_changed(self) -> None:
        # bfloat16_dispatch is the dispatch strategy's precision.
        precision = DispatchPrecision(round_to=torch.bfloat16 if self.settings.bfloat16_dispatch else None)
        if precision != self._dispatch.precision:
            self._dispatch = self._dispatch.with_precision(precision)

    @property
    def k(self) -> int:
        """Choices per token (K; K' = m*K after fine-grained segmentation)."""
        return self.settings.k

    @property
    def expert_parallel(self):
        """The :class:`vmoe.distributed.ExpertParallel` layout when the dispatch is expert-parallel, else None."""
        return getattr(self._dispatch, "expert_parallel", None)

    @property
    def experts_per_token(self) -> int:
        return self.k

    def capacity(self, group_size: int, training: bool | None = None) -> int:
        """Slots per expert (C) for a routing group of S = ``group_size`` tokens, in training (True), eval
        (False) or the block's current mode (None): ``compute_capacity(S * K, E, factor)``, or tokens per
        expert when experts choose tokens."""
        factor = self.settings.factor(self.training if training is None else training)
        if self.router.experts_choose:
            return expert_choice_capacity(group_size, self.num_experts, factor)
        return compute_capacity(group_size * self.settings.k, self.num_experts, factor)

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, T, D] -> [B, T, D_out]; B = 0 or T = 0 gives an empty [B, T, D_out] like timm's Mlp."""
        if x.dim() != 3 or x.shape[-1] != self.in_features:
            raise ValueError(f"MoEMlp expects x of shape [B, T, D={self.in_features}], got {tuple(x.shape)}")
        b, t, d = x.shape
        if b * t == 0:
            return self._empty(x)
        size = self._groups_of(b * t)
        groups = x.reshape(b * t // size, size, d)  # [G, S, D]
        capacity = self.capacity(size)  # once per forward: the router and the dispatch share it
        settings = self.settings
        out = (self.router(groups, settings, capacity, seq_len=t) if self._router_takes_seq_len
               else self.router(groups, settings, capacity))
        routing = out.routing
        flat = x.reshape(b * t, -1)
        y = self._dispatch(flat, routing, self.experts, capacity)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        if self.residual is not None:
            y = self.residual(flat, y)
        if not torch.compiler.is_exporting():  # an exported program returns its output only
            self.aux_loss = out.aux_loss
            self.metrics = {**routing_metrics(routing, self.num_experts), **out.metrics}
            self.last_routing = routing.reshape(b, t)
        return y.reshape(b, t, -1)

    def _empty(self, x: Tensor) -> Tensor:
        """No tokens: an empty output still connected to x and the expert weights, zero metrics."""
        b, t, d = x.shape
        flat = x.reshape(0, d)
        y = self.experts.forward_expert(0, flat)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        if self.residual is not None:
            y = self.residual(flat, y)
        k = self.k or 1
        index = torch.zeros(b, t, k, dtype=torch.long, device=x.device)
        self.last_routing = Routing(index, index - 1, torch.zeros(b, t, k, device=x.device))
        self.aux_loss = y.new_zeros((), dtype=torch.float32)
        zero = torch.zeros((), device=x.device)
        self.metrics = {"tokens_per_expert": torch.zeros(self.num_experts, device=x.device),
                        "dropped_fraction": zero, "dropped_tokens_fraction": zero, "load_cv": zero}
        return y.reshape(b, t, y.shape[-1])

    def extra_repr(self) -> str:
        s = self.settings
        return (f"k={s.k}, capacity_factor={s.capacity_factor}, eval_capacity_factor={s.eval_capacity_factor}, "
                f"batch_priority={s.batch_priority}, group_size={s.group_size}"
                + (", bfloat16_dispatch=True" if s.bfloat16_dispatch else ""))


@torch.no_grad()
def routing_metrics(routing: Routing, num_experts: int) -> dict[str, Tensor]:
    """Detached load statistics of a routing [..., S, K] (no host sync, no bincount: compile-clean and
    deterministic on CUDA, counts are integer scatter-adds into [E]).

    tokens_per_expert [E]: kept assignments per expert, summed over groups.
    dropped_fraction: share of assignments that got no slot.
    dropped_tokens_fraction: share of tokens whose every choice was dropped.
    load_cv: std/mean of the assignments requested per expert (before capacity), a balance measure.
    """
    expert = routing.expert_index.reshape(-1)
    kept = routing.slot_index.reshape(-1) >= 0
    zeros = torch.zeros(num_experts, dtype=torch.long, device=expert.device)
    requested = zeros.scatter_add(0, expert, torch.ones_like(expert)).float()
    tokens = zeros.scatter_add(0, expert, kept.long()).float()
    kept_tokens = routing.kept.reshape(-1, routing.kept.shape[-1]).any(-1)
    return {
        "tokens_per_expert": tokens,
        "dropped_fraction": 1.0 - kept.float().mean(),
        "dropped_tokens_fraction": 1.0 - kept_tokens.float().mean(),
        "load_cv": requested.std(unbiased=False) / requested.mean().clamp_min(1e-10),
    }
