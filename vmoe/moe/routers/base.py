"""The router interface every routing scheme implements, and the registry that names them."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
from torch import Tensor, nn

from ..capacity import compute_capacity
from ..checks import check_non_negative, check_positive_float, check_positive_int
from ..routing import Routing, route_choices

__all__ = ["RouterOutput", "Router", "ROUTERS", "register_router", "build_router", "float32_logits",
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
    """Base router: the routing settings that can change on a trained model, the router weight, and the
    step every token-choice scheme ends with (slots by capacity, BPR order).

    capacity_factor applies in training, eval_capacity_factor (default: the training one) in eval mode;
    both, and batch_priority, may be changed at any time without touching the weights.
    ``dim`` given: the router owns ``weight`` [E, D] ~ truncated N(0, 0.02^2), the logits x W^T.
    A subclass computes its scores in ``forward`` and hands its choices to :meth:`route` (or gates to
    :meth:`route_top_k`); it checks its loss weights with :meth:`check_non_negative`.
    """

    # True: forward takes seq_len=T (tokens per image) besides x, for per-sequence losses.
    uses_sequence_length: ClassVar[bool] = False
    # True: the loss depends on which rank holds which expert (attribute num_devices, set by sharding).
    uses_device_placement: ClassVar[bool] = False

    def __init__(self, num_experts: int, k: int, capacity_factor: float = 1.05,
                 eval_capacity_factor: float | None = None, batch_priority: bool = False, *,
                 dim: int | None = None) -> None:
        super().__init__()
        check_positive_int("num_experts", num_experts)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_experts:
            raise ValueError(f"k must be in [1, num_experts={num_experts}], got {k!r}")
        self.num_experts, self.k = num_experts, k
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.batch_priority = batch_priority
        if dim is not None:
            check_positive_int("dim", dim)
            self.weight = nn.Parameter(torch.empty(num_experts, dim))
            nn.init.trunc_normal_(self.weight, std=0.02)

    check_non_negative = staticmethod(check_non_negative)

    @property
    def capacity_factor(self) -> float:
        return self._capacity_factor

    @capacity_factor.setter
    def capacity_factor(self, value: float) -> None:
        check_positive_float("capacity_factor", value)
        self._capacity_factor = float(value)

    @property
    def eval_capacity_factor(self) -> float:
        """The factor used in eval mode (the training one unless set); see :attr:`eval_capacity_factor_setting`."""
        return self._capacity_factor if self._eval_capacity_factor is None else self._eval_capacity_factor

    @eval_capacity_factor.setter
    def eval_capacity_factor(self, value: float | None) -> None:
        check_positive_float("eval_capacity_factor", value, optional=True, what=" (= capacity_factor)")
        self._eval_capacity_factor = None if value is None else float(value)

    @property
    def eval_capacity_factor_setting(self) -> float | None:
        """The eval factor as set: None means "follow capacity_factor" (what a restore must put back)."""
        return self._eval_capacity_factor

    def capacity(self, group_size: int, training: bool | None = None) -> int:
        """Slots per expert for a group of ``group_size`` tokens at the factor of training (True), eval
        (False) or the router's current mode (None)."""
        training = self.training if training is None else training
        factor = self.capacity_factor if training else self.eval_capacity_factor
        return compute_capacity(group_size * self.k, self.num_experts, factor)

    def logits(self, x: Tensor) -> Tensor:
        """x: [G, S, D] -> x W^T [G, S, E] in float32 (also under autocast)."""
        return float32_logits(x, self.weight)

    def route(self, expert_index: Tensor, weights: Tensor, keep: Tensor | None = None) -> Routing:
        """Slots for the choices made: expert_index, weights [G, S, K] (combine weights, descending), keep
        [G, S, K] bool or None. With BPR the tokens with the largest first weight are served first."""
        priority = weights[..., 0] if self.batch_priority else None
        capacity = self.capacity(expert_index.shape[-2])
        return route_choices(expert_index, weights, self.num_experts, capacity, priority, keep)

    def route_top_k(self, gates: Tensor) -> Routing:
        """Token-choice top-k on gates [G, S, E]: the k largest gates are the choices and their weights."""
        values, expert_index = torch.topk(gates, self.k, dim=-1)
        return self.route(expert_index, values)

    def forward(self, x: Tensor) -> RouterOutput:  # pragma: no cover - interface
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, k={self.k}, capacity_factor={self.capacity_factor}, "
                f"eval_capacity_factor={self.eval_capacity_factor}, batch_priority={self.batch_priority}")


ROUTERS: dict[str, type[Router]] = {}


def register_router(name: str) -> Callable[[type[Router]], type[Router]]:
    def wrap(cls: type[Router]) -> type[Router]:
        ROUTERS[name] = cls
        return cls
    return wrap


def build_router(name: str, **kwargs) -> Router:
    if name not in ROUTERS:
        raise ValueError(f"unknown router {name!r}; valid: {sorted(ROUTERS)}")
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
