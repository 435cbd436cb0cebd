"""The E³ MoE block: an :class:`MoEMlp` over a batch repeated M times, members routed among their own experts.

The model repeats each image M times before its first MoE block (sequence row ``b*M + m`` is image b for
member m, see :class:`vmoe.models.ensemble.EnsembleVisionTransformer`). This block reorders its input
[B*M, T, D] to routing rows ordered (image, token, member) as the reference does, so that a routing
group of S rows holds S/M tokens of every member, routes them with the ``ensemble`` router and
restores the sequence order on the way out.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .layer import MoEMlp

__all__ = ["EnsembleMoEMlp"]


class EnsembleMoEMlp(MoEMlp):
    """MoEMlp (timm Mlp arguments + MoE settings) for E³ with ``ensemble_size`` M members.

    The E experts are split into M contiguous sets of E/M; member m uses set m. ``group_size`` counts
    routing rows (tokens x members), as the reference's E³ configs do; it must be a multiple of M.
    ``last_routing`` is [B*M, T, K] like the sequences (row b*M + m = image b, member m); the routing rows
    themselves are ordered (image, token, member).
    """

    def __init__(self, *args: Any, ensemble_size: int = 2, router: str = "ensemble",
                 router_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if router != "ensemble":
            raise ValueError(f"EnsembleMoEMlp routes with the 'ensemble' router, got router={router!r}")
        if router_kwargs and "ensemble_size" in router_kwargs:
            raise ValueError("give ensemble_size once, as an EnsembleMoEMlp argument (moe_kwargs), not in "
                             "router_kwargs")
        super().__init__(*args, router=router, router_kwargs={**(router_kwargs or {}), "ensemble_size": ensemble_size},
                         **kwargs)
        self.ensemble_size = ensemble_size

    def forward(self, x: Tensor) -> Tensor:
        """x: [B*M, T, D] (row b*M + m = image b, member m) -> [B*M, T, D_out]."""
        m = self.ensemble_size
        if x.dim() != 3 or x.shape[0] % m:
            raise ValueError(f"EnsembleMoEMlp expects [B*M, T, D] with M={m} dividing the first axis, got "
                             f"{tuple(x.shape)} (is the model repeating the batch before its first MoE block?)")
        bm, t, d = x.shape
        rows = x.reshape(bm // m, m, t, d).transpose(1, 2).reshape(bm // m, t * m, d)  # (b, t, m) order
        y = super().forward(rows)
        if not torch.compiler.is_exporting():  # the parent records nothing while exporting
            routing = self.last_routing  # [B, T*M, K] in routing-row order -> [B*M, T, K] like the sequences
            self.last_routing = type(routing)(*(r.reshape(bm // m, t, m, -1).transpose(1, 2).reshape(bm, t, -1)
                                                for r in routing))
        return y.reshape(bm // m, t, m, -1).transpose(1, 2).reshape(bm, t, -1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ensemble_size={self.ensemble_size}"
