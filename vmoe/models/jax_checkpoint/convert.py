"""Reference (flax) params tree -> state dict of the timm V-MoE built for it.

Layouts: flax Dense kernels are [in, out] (nn.Linear is [out, in]); the patch embedding is an HWIO
convolution [P, P, C, D] (torch: [D, C, P, P]); attention q/k/v kernels are [D, h, d] and the output
kernel [h, d, D]; expert kernels are stacked [E, D, H] / [E, H, D] (ours: [E, H, D] / [E, D, H]); an E³
router kernel [D, M, E/M] is member-major, the same expert order as ours flattened to [E, D].
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from torch import Tensor

from .architecture import ReferenceArchitecture

__all__ = ["reference_state_dict"]


def _t(a: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def _block(arrays: Mapping[str, np.ndarray], i: int, moe: bool, dim: int) -> dict[str, np.ndarray]:
    src, dst = f"Encoder/encoderblock_{i}", f"blocks.{i}"
    attn = f"{src}/SelfAttention"
    ln0, ln1 = f"{src}/LayerNorm_0", f"{src}/LayerNorm_1"
    qkv = ("query", "key", "value")
    out = {
        f"{dst}.norm1.weight": arrays[f"{ln0}/scale"], f"{dst}.norm1.bias": arrays[f"{ln0}/bias"],
        f"{dst}.norm2.weight": arrays[f"{ln1}/scale"], f"{dst}.norm2.bias": arrays[f"{ln1}/bias"],
        # timm's fused qkv: rows [q; k; v], each [h*d, D]
        f"{dst}.attn.qkv.weight": np.concatenate([arrays[f"{attn}/{n}/kernel"].reshape(dim, dim).T for n in qkv]),
        f"{dst}.attn.qkv.bias": np.concatenate([arrays[f"{attn}/{n}/bias"].reshape(dim) for n in qkv]),
        f"{dst}.attn.proj.weight": arrays[f"{attn}/out/kernel"].reshape(dim, dim).T,
        f"{dst}.attn.proj.bias": arrays[f"{attn}/out/bias"],
    }
    if moe:
        mlp = f"{src}/Moe/Mlp"
        router = arrays[f"{src}/Moe/Router/dense/kernel"]
        out.update({
            f"{dst}.mlp.router.weight": router.reshape(dim, -1).T,
            f"{dst}.mlp.experts.fc1_weight": arrays[f"{mlp}/Dense_0/kernel"].transpose(0, 2, 1),
            f"{dst}.mlp.experts.fc1_bias": arrays[f"{mlp}/Dense_0/bias"],
            f"{dst}.mlp.experts.fc2_weight": arrays[f"{mlp}/Dense_1/kernel"].transpose(0, 2, 1),
            f"{dst}.mlp.experts.fc2_bias": arrays[f"{mlp}/Dense_1/bias"],
        })
    else:
        mlp = f"{src}/Mlp"
        for j in (0, 1):
            out[f"{dst}.mlp.fc{j + 1}.weight"] = arrays[f"{mlp}/Dense_{j}/kernel"].T
            out[f"{dst}.mlp.fc{j + 1}.bias"] = arrays[f"{mlp}/Dense_{j}/bias"]
    return out


def _expected_sources(arch: ReferenceArchitecture) -> set[str]:
    keys = {"embedding/kernel", "embedding/bias", "Encoder/posembed_input/pos_embedding", "Encoder/encoder_norm/scale",
            "Encoder/encoder_norm/bias", "head/kernel", "head/bias"}
    keys |= {"cls"} if arch.classifier == "token" else set()
    keys |= {"pre_logits/kernel", "pre_logits/bias"} if arch.representation_size else set()
    for i in range(arch.depth):
        base = f"Encoder/encoderblock_{i}"
        keys |= {f"{base}/LayerNorm_{j}/{p}" for j in (0, 1) for p in ("scale", "bias")}
        keys |= {f"{base}/SelfAttention/{n}/{p}" for n in ("query", "key", "value", "out") for p in ("kernel", "bias")}
        mlp = f"{base}/Moe/Mlp" if i in arch.moe_layers else f"{base}/Mlp"
        keys |= {f"{mlp}/Dense_{j}/{p}" for j in (0, 1) for p in ("kernel", "bias")}
        keys |= {f"{base}/Moe/Router/dense/kernel"} if i in arch.moe_layers else set()
    return keys


def reference_state_dict(arrays: Mapping[str, np.ndarray], arch: ReferenceArchitecture) -> dict[str, Tensor]:
    """The state dict (float32 tensors, timm/vmoe key names) of the model of ``arch`` from a params tree.

    Raises ValueError listing arrays of the tree that have no place in the model (e.g. a router bias or
    optimizer state), or that the model needs and the tree lacks.
    """
    expected = _expected_sources(arch)
    missing, unexpected = sorted(expected - set(arrays)), sorted(set(arrays) - expected)
    if missing or unexpected:
        raise ValueError(f"the reference tree does not fit the inferred architecture: missing {missing}, "
                         f"unexpected {unexpected}")
    dim = arch.embed_dim
    state = {
        "patch_embed.proj.weight": arrays["embedding/kernel"].transpose(3, 2, 0, 1),
        "patch_embed.proj.bias": arrays["embedding/bias"],
        "pos_embed": arrays["Encoder/posembed_input/pos_embedding"],
        "norm.weight": arrays["Encoder/encoder_norm/scale"], "norm.bias": arrays["Encoder/encoder_norm/bias"],
        "head.weight": arrays["head/kernel"].T, "head.bias": arrays["head/bias"],
    }
    if arch.classifier == "token":
        state["cls_token"] = arrays["cls"]
    if arch.representation_size:
        state["pre_logits.fc.weight"] = arrays["pre_logits/kernel"].T
        state["pre_logits.fc.bias"] = arrays["pre_logits/bias"]
    for i in range(arch.depth):
        state.update(_block(arrays, i, i in arch.moe_layers, dim))
    return {key: _t(value) for key, value in state.items()}
