"""Expert structure around the routed experts: DeepSeekMoE fine-grained segmentation and shared experts,
DeepSpeed-MoE residual MoE (docs/design.md, "Expert structure")."""
from __future__ import annotations

from typing import NamedTuple

from timm.layers import Mlp
from torch import Tensor, nn

__all__ = ["FineGrained", "fine_grained", "SharedExperts", "ResidualMLP"]


class FineGrained(NamedTuple):
    """Routed-expert layout after segmenting each of E experts into m: E' = m*E experts of hidden H/m,
    K' = m*K choices per token (None for routers without a per-token k)."""

    num_experts: int
    k: int | None
    hidden_features: int


def fine_grained(router: str, has_k: bool, num_experts: int, k: int, hidden_features: int,
                 granularity: int) -> FineGrained:
    """E' = m*E routed experts of hidden H/m and K' = m*K choices: the same expert parameters
    (2*E*H*D weights) and the same expert FLOPs per token (K' * 4*D*H/m = 4*K*D*H) as m = 1.

    ``k``: the resolved K; ``has_k``: whether the scheme routes a per-token k. Raises ValueError when H is
    not divisible by m or when the router has no per-token k (expert_choice, dense) and m > 1.
    """
    if isinstance(granularity, bool) or not isinstance(granularity, int) or granularity < 1:
        raise ValueError(f"expert_granularity must be an int >= 1, got {granularity!r}")
    if granularity == 1:
        return FineGrained(num_experts, k, hidden_features)
    if hidden_features % granularity:
        raise ValueError(f"expert_granularity={granularity} must divide the expert hidden width "
                         f"H={hidden_features}")
    if not has_k:
        raise ValueError(f"expert_granularity={granularity} multiplies the per-token k, but router "
                         f"{router!r} has no per-token k; use a top-k router (vmoe, deepseek, mixtral, ...)")
    return FineGrained(num_experts * granularity, k * granularity, hidden_features // granularity)


class SharedExperts(Mlp):
    """K_s experts every token passes through (DeepSeekMoE), their output added to the routed one.

    K_s MLPs of hidden H_e summed equal one MLP of hidden K_s * H_e whose fc2 bias is the sum of theirs,
    so they are stored and run as a single timm Mlp: fc1 [K_s*H_e, D], fc2 [D_out, K_s*H_e].
    """

    def __init__(self, num_experts: int, in_features: int, hidden_features: int, out_features: int | None = None,
                 act_layer: type[nn.Module] = nn.GELU, bias: bool = True, drop: float = 0.0) -> None:
        if num_experts < 1:
            raise ValueError(f"num_shared_experts must be >= 1 to build SharedExperts, got {num_experts}")
        super().__init__(in_features, num_experts * hidden_features, out_features, act_layer=act_layer,
                         bias=bias, drop=drop)
        self.num_experts = num_experts


class ResidualMLP(nn.Module):
    """DeepSpeed-MoE residual MoE: a dense MLP (hidden H, like one expert) run on every token, added to
    the MoE output: y = MLP(x) + MoE(x) (the paper's formulation).

    learned_coefficient=True uses DeepSpeed's implementation instead: a per-token softmax mix
    [a, b] = softmax(x W_c + b_c) (W_c: Linear(D, 2)), y = a * MoE(x) + b * MLP(x).
    """

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None,
                 act_layer: type[nn.Module] = nn.GELU, bias: bool = True, drop: float = 0.0,
                 learned_coefficient: bool = False) -> None:
        super().__init__()
        self.mlp = Mlp(in_features, hidden_features, out_features, act_layer=act_layer, bias=bias, drop=drop)
        self.coefficient = nn.Linear(in_features, 2) if learned_coefficient else None

    def forward(self, x: Tensor, moe_out: Tensor) -> Tensor:
        """x: [N, D] block input, moe_out: [N, D_out] -> [N, D_out]."""
        dense = self.mlp(x)
        if self.coefficient is None:
            return moe_out + dense
        mix = self.coefficient(x).float().softmax(-1).to(dense.dtype)
        return moe_out * mix[..., :1] + dense * mix[..., 1:]
