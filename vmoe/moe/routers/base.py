"""The router interface every routing scheme implements, and the registry that names them."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from ..capacity import compute_capacity
from ..routing import Routing

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
    """Base router: holds the routing settings that can change on a trained model.

    capacity_factor applies in training, eval_capacity_factor (default: the training one) in eval mode;
    both, and batch_priority, may be changed at any time without touching the weights.
    """

    def __init__(self, num_experts: int, k: int, capacity_factor: float = 1.05,
                 eval_capacity_factor: float | None = None, batch_priority: bool = False) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if not 1 <= k <= num_experts:
            raise ValueError(f"k must be in [1, num_experts={num_experts}], got {k}")
        self.num_experts, self.k = num_experts, k
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.batch_priority = batch_priority

    @property
    def capacity_factor(self) -> float:
        return self._capacity_factor

    @capacity_factor.setter
    def capacity_factor(self, value: float) -> None:
        if not value > 0:
            raise ValueError(f"capacity_factor must be > 0, got {value}")
        self._capacity_factor = float(value)

    @property
    def eval_capacity_factor(self) -> float:
        return self._capacity_factor if self._eval_capacity_factor is None else self._eval_capacity_factor

    @eval_capacity_factor.setter
    def eval_capacity_factor(self, value: float | None) -> None:
        if value is not None and not value > 0:
            raise ValueError(f"eval_capacity_factor must be > 0 or None (= capacity_factor), got {value}")
        self._eval_capacity_factor = None if value is None else float(value)

    def capacity(self, group_size: int) -> int:
        """Slots per expert for a group of ``group_size`` tokens at the current mode's factor."""
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        return compute_capacity(group_size * self.k, self.num_experts, factor)

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
