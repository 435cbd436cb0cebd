"""The router interface every routing scheme implements, and the registry that names them."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn

from ..checks import check_positive_int
from ..routing import Routing, route_choices
from ..settings import V_MOE_CAPACITY_FACTOR, RoutingSettings

__all__ = ["RouterOutput", "Router", "ROUTERS", "register_router", "build_router", "router_class", "float32_logits",
           "after_optimizer_step"]


@dataclass
class RouterOutput:
    """What a router returns for x [G, S, D].

    routing: a :class:`Routing` with tensors [G, S, K].
    aux_loss: weighted auxiliary loss, a scalar in the graph (0 when the scheme has none).
    metrics: detached extra metrics of the scheme (the layer adds the common ones).
    """

    routing: Routing
    aux_loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


class Router(nn.Module):
    """Base router: the router weight, the scheme's routing defaults and the step every token-choice
    scheme ends with (slots by capacity, BPR order).

    A router holds no routing settings: the block passes its :class:`RoutingSettings` and the capacity it
    computed for the forward, so a setting has one home (the block) and capacity is computed once.
    ``dim`` given: the router owns ``weight`` [E, D] ~ truncated N(0, 0.02^2), the logits x W^T.
    A subclass computes its scores in ``forward`` and hands its choices to :meth:`route` (or gates to
    :meth:`route_top_k`). Class attributes say which settings the scheme reads (``settings_used``) and
    their defaults (:meth:`default_settings`).
    """

    # True: forward takes seq_len=T (tokens per image) besides x, for per-sequence losses.
    uses_sequence_length: ClassVar[bool] = False
    # True: the loss depends on which rank holds which expert (attribute num_devices, set by sharding).
    uses_device_placement: ClassVar[bool] = False
    # True: experts choose tokens (capacity = tokens per expert), not tokens experts.
    experts_choose: ClassVar[bool] = False
    # The RoutingSettings fields this scheme reads; setting any other is an error.
    settings_used: ClassVar[frozenset[str]] = frozenset(
        {"k", "capacity_factor", "eval_capacity_factor", "batch_priority", "group_size", "bfloat16_dispatch"})

    def __init__(self, num_experts: int, *, dim: int | None = None) -> None:
        super().__init__()
        check_positive_int("num_experts", num_experts)
        self.num_experts = num_experts
        if dim is not None:
            check_positive_int("dim", dim)
            self.weight = nn.Parameter(torch.empty(num_experts, dim))
            nn.init.trunc_normal_(self.weight, std=0.02)

    @classmethod
    def default_settings(cls, num_experts: int) -> dict[str, Any]:
        """The scheme's value of each setting left unset (k, capacity_factor, noise_std)."""
        return {"k": 2, "capacity_factor": V_MOE_CAPACITY_FACTOR}

    def check_settings(self, settings: RoutingSettings) -> None:
        """ValueError when resolved ``settings`` do not fit this router (k range, scheme rules)."""
        k = settings.k
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.num_experts:
            raise ValueError(f"k must be in [1, num_experts={self.num_experts}], got {k!r}")

    def logits(self, x: Tensor) -> Tensor:
        """x: [G, S, D] -> x W^T [G, S, E] in float32 (also under autocast)."""
        return float32_logits(x, self.weight)

    def route(self, expert_index: Tensor, weights: Tensor, settings: RoutingSettings, capacity: int,
              keep: Tensor | None = None) -> Routing:
        """Slots for the choices made: expert_index, weights [G, S, K] (combine weights, descending), keep
        [G, S, K] bool or None. With BPR the tokens with the largest first weight are served first."""
        priority = weights[..., 0] if settings.batch_priority else None
        return route_choices(expert_index, weights, self.num_experts, capacity, priority, keep)

    def route_top_k(self, gates: Tensor, settings: RoutingSettings, capacity: int) -> Routing:
        """Token-choice top-k on gates [G, S, E]: the k largest gates are the choices and their weights."""
        values, expert_index = torch.topk(gates, settings.k, dim=-1)
        return self.route(expert_index, values, settings, capacity)

    def forward(self, x: Tensor, settings: RoutingSettings, capacity: int) -> RouterOutput:  # pragma: no cover
        """x: [G, S, D], the block's resolved settings and capacity C -> routing [G, S, K]."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}"


ROUTERS: dict[str, type[Router]] = {}


def register_router(name: str) -> Callable[[type[Router]], type[Router]]:
    def wrap(cls: type[Router]) -> type[Router]:
        ROUTERS[name] = cls
        return cls
    return wrap


def router_class(name: str) -> type[Router]:
    """The router registered as ``name``; ValueError naming the valid ones."""
    if name not in ROUTERS:
        raise ValueError(f"unknown router {name!r}; valid: {sorted(ROUTERS)}")
    return ROUTERS[name]


def build_router(name: str, **kwargs) -> Router:
    """The router ``name`` built with its constructor ``kwargs`` (dim, num_experts, loss weights, ...)."""
    router_class(name)
    # A setting the scheme has no use for is an error, never silently dropped.
    params = inspect.signature(ROUTERS[name].__init__).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        accepted = [p for p in params if p != "self"]
        unused = sorted(set(kwargs) - set(accepted))
        if unused:
            raise ValueError(f"router {name!r} does not use {unused}; it accepts {accepted}")
    return ROUTERS[name](**kwargs)


def float32_logits(x: Tensor, weight: Tensor) -> Tensor:
    """Router logits x @ W^T computed in float32 even under autocast. x: [..., D], weight: [E, D]."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        return torch.nn.functional.linear(x.float(), weight.float())


def after_optimizer_step(model: nn.Module) -> None:
    """Call ``on_optimizer_step()`` on every module that defines it (e.g. DeepSeek-V3's bias update).

    The training loop calls this once per optimizer step, after the step, so state that must change per
    step (not per micro-batch under gradient accumulation) changes exactly then.
    """
    for module in model.modules():
        hook = getattr(module, "on_optimizer_step", None)
        if callable(hook):
            hook()
