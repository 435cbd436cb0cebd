"""Sparse upcycling: start a V-MoE from a dense ViT (Komatsuzaki et al. 2022).

Every expert of an MoE block starts as a copy of that block's dense MLP (plus optional noise), the router
starts small so the first steps route almost uniformly, and every other tensor is copied; timm's ViT
checkpoint filter converts foreign formats and resamples patch/position embeddings, the head is reset
when the class count differs.
"""
from __future__ import annotations

import logging
from typing import Mapping

import torch
from timm.models._manipulate import adapt_input_conv
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import Tensor, nn

from ..moe import iter_moe_mlps
from .checkpoint import extract_state_dict

__all__ = ["upcycle_state_dict", "EXPERT_FROM_DENSE"]

_log = logging.getLogger(__name__)
# Stacked expert tensor name -> dense timm Mlp tensor it copies (nn.Linear layout per expert, docs/design.md).
EXPERT_FROM_DENSE = {"experts.fc1_weight": "fc1.weight", "experts.fc1_bias": "fc1.bias",
                     "experts.fc2_weight": "fc2.weight", "experts.fc2_bias": "fc2.bias"}
_RESIDUAL = "residual.mlp."  # DeepSpeed-MoE residual block: a dense Mlp beside the experts


# Tensors timm's checkpoint filter resizes when the patch size or image size differs.
_RESAMPLED = ("patch_embed.proj.weight", "pos_embed")


def _log_resampled(before: Mapping[str, tuple[int, ...]], state: Mapping[str, Tensor], model: nn.Module) -> None:
    """Say (logging WARNING, named after the sizes) which embeddings timm resampled to fit ``model``."""
    for key, shape in before.items():
        after = tuple(state[key].shape) if key in state else None
        if after is not None and after != shape:
            what = (f"patch size {shape[-2:]} -> {after[-2:]}" if key == "patch_embed.proj.weight"
                    else f"{shape[-2]} -> {after[-2]} positions (image size {tuple(model.patch_embed.img_size)})")
            _log.warning("upcycling: resampled %s from %s to %s (%s)", key, shape, after, what)


def _classifier_keys(model: nn.Module) -> set[str]:
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "head"
    names = (names,) if isinstance(names, str) else tuple(names)
    return {f"{name}.{p}" for name in names for p in ("weight", "bias")}


def _noisy_copies(dense: Tensor, num: int, noise: float, generator: torch.Generator | None) -> Tensor:
    """[E, *dense.shape]: E copies of ``dense``, each plus N(0, (noise * std(dense))^2) when noise > 0."""
    out = dense.detach().unsqueeze(0).expand(num, *dense.shape).clone()
    if noise > 0 and dense.numel() > 1:
        eps = torch.randn(out.shape, generator=generator, dtype=torch.float32).to(out.device)
        out += (noise * dense.detach().float().std() * eps).to(out.dtype)
    return out


def upcycle_state_dict(
    dense: Mapping[str, Tensor],
    model: nn.Module,
    *,
    expert_noise: float = 0.0,
    router_init_std: float = 0.01,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """A full state dict for the V-MoE ``model`` built from a dense ViT's state dict.

    MoE block at ``p`` (e.g. "blocks.1.mlp"): ``p.experts.fc1_weight`` [E, H, D] = E copies of the
    dense ``p.fc1.weight`` [H, D] (likewise fc1 bias, fc2 weight [E, D, H], fc2 bias), each plus
    N(0, (expert_noise * std)^2); a residual MoE's fixed ``p.residual.mlp`` copies the dense MLP;
    ``p.router.weight`` [E, D] ~ N(0, router_init_std^2) (0 gives all-equal
    gates); other tensors of the MoE block keep the model's fresh values. Every other tensor is copied,
    except that a classifier of a different size keeps the model's fresh one (head reset) and the patch
    embedding is adapted to the model's in_chans. Raises ValueError listing every missing, unexpected or
    mismatched key.
    """
    if expert_noise < 0 or router_init_std < 0:
        raise ValueError(f"expert_noise and router_init_std must be >= 0, got {expert_noise}, {router_init_std}")
    state = extract_state_dict(dense)
    if isinstance(model, VisionTransformer):
        before = {key: tuple(state[key].shape) for key in _RESAMPLED if key in state}
        state = checkpoint_filter_fn(state, model)  # foreign layouts, patch/pos-embed resampling
        _log_resampled(before, state, model)
    plan = _Upcycling(state, _classifier_keys(model), expert_noise, router_init_std, generator)
    moe_prefixes = [name + "." for name, _ in iter_moe_mlps(model)]
    # One pass in the model's key order, so the random draws (expert noise, router) are reproducible.
    for key, fresh in model.state_dict().items():
        prefix = next((p for p in moe_prefixes if key.startswith(p)), None)
        if prefix is None:
            plan.copy_dense(key, fresh)
        else:
            plan.fill_moe(prefix, key, fresh)
    plan.raise_on_problems()
    return plan.out


class _Upcycling:
    """The state dict being built by :func:`upcycle_state_dict`, and the problems found on the way."""

    def __init__(self, state: Mapping[str, Tensor], heads: set[str], expert_noise: float, router_init_std: float,
                 generator: torch.Generator | None) -> None:
        self.state, self.heads = state, heads
        self.expert_noise, self.router_init_std, self.generator = expert_noise, router_init_std, generator
        self.out: dict[str, Tensor] = {}
        self.used: set[str] = set()
        self.missing: list[str] = []
        self.mismatched: list[str] = []

    def fill_moe(self, prefix: str, key: str, fresh: Tensor) -> None:
        """A tensor of the MoE block at ``prefix``: experts and a residual MLP from the dense MLP, a small
        random router, anything else (e.g. balancing biases) as the model initialised it."""
        local = key[len(prefix):]
        if local.startswith(_RESIDUAL):  # residual MoE: its fixed MLP is the dense one
            self._copy_exact(prefix + local[len(_RESIDUAL):], key, fresh)
        elif local in EXPERT_FROM_DENSE:
            source = prefix + EXPERT_FROM_DENSE[local]
            if source not in self.state:
                self.missing.append(f"{source} (for {key})")
            elif tuple(self.state[source].shape) != tuple(fresh.shape[1:]):
                self.mismatched.append(f"{source} {tuple(self.state[source].shape)} vs expert {tuple(fresh.shape[1:])}")
            else:
                self.out[key] = _noisy_copies(self.state[source], fresh.shape[0], self.expert_noise, self.generator)
                self.used.add(source)
        elif local == "router.weight":
            self.out[key] = torch.randn(fresh.shape, generator=self.generator).to(fresh) * self.router_init_std
        else:
            self.out[key] = fresh
            _log.info("upcycling: %s keeps its fresh initial value", key)

    def _copy_exact(self, source: str, key: str, fresh: Tensor) -> None:
        value = self.state.get(source)
        if value is None or tuple(value.shape) != tuple(fresh.shape):
            shape = tuple(value.shape) if value is not None else "absent"
            self.mismatched.append(f"{source} {shape} for {key} {tuple(fresh.shape)}")
        else:
            self.out[key] = value
            self.used.add(source)

    def copy_dense(self, key: str, fresh: Tensor) -> None:
        """A tensor outside the MoE blocks: copied; a classifier of another size or absent is reset; a patch
        embedding with other input channels is adapted."""
        if key not in self.state:
            if key in self.heads:  # the dense weights have no classifier: the model's new head stays
                self.out[key] = fresh
            else:
                self.missing.append(key)
            return
        value = self.state[key]
        self.used.add(key)
        if tuple(value.shape) == tuple(fresh.shape):
            self.out[key] = value
        elif key in self.heads:
            self.out[key] = fresh
            _log.info("upcycling: %s reset (checkpoint %s, model %s)", key, tuple(value.shape), tuple(fresh.shape))
        elif (key == "patch_embed.proj.weight" and value.shape[0] == fresh.shape[0]
              and value.shape[2:] == fresh.shape[2:]):  # only in_chans differs
            self.out[key] = adapt_input_conv(fresh.shape[1], value, base_chans=value.shape[1])
        else:
            self.mismatched.append(f"{key} checkpoint {tuple(value.shape)} vs model {tuple(fresh.shape)}")

    def raise_on_problems(self) -> None:
        # A dense classifier the model does not have (num_classes=0) is dropped like a reset head.
        unexpected = sorted(key for key in set(self.state) - self.used if key not in self.heads)
        missing, mismatched = self.missing, self.mismatched
        if not (missing or unexpected or mismatched):
            return
        raise ValueError("\n".join(
            [f"cannot upcycle: the dense weights do not fit the V-MoE ({len(missing)} missing, "
             f"{len(unexpected)} unexpected, {len(mismatched)} mismatched)"]
            + [f"  missing:    {k}" for k in missing] + [f"  unexpected: {k}" for k in unexpected]
            + [f"  mismatched: {k}" for k in mismatched]
            + ["  (is the dense model the same architecture as the V-MoE backbone? V-MoE weights load with "
               "vmoe.models.load_weights)"]))
