"""The reference ViT-MoE forward pass written directly from its description, in float64 numpy.

Used to check models the shared fixtures do not cover (``gap``, many blocks, a representation layer).
MoE blocks keep every assignment (the caller picks a capacity large enough), so no dispatch is modelled.
"""
from __future__ import annotations

import numpy as np


def _ln(x, scale, bias):
    mean = x.mean(-1, keepdims=True)
    var = (x * x).mean(-1, keepdims=True) - mean * mean  # flax's fast variance
    return (x - mean) / np.sqrt(var + 1e-6) * scale + bias


def _gelu(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def forward(tree: dict, images_nchw: np.ndarray, k: int = 2) -> np.ndarray:
    t = {key: value.astype(np.float64) for key, value in tree.items()}
    x = images_nchw.astype(np.float64).transpose(0, 2, 3, 1)  # NHWC
    p = t["embedding/kernel"].shape[0]
    b, h, w, c = x.shape
    patches = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    x = np.einsum("bijpqc,pqcd->bijd", patches, t["embedding/kernel"]).reshape(b, -1, t["embedding/bias"].size)
    x = x + t["embedding/bias"]
    if "cls" in t:
        x = np.concatenate([np.broadcast_to(t["cls"], (b, 1, x.shape[-1])), x], axis=1)
    x = x + t["Encoder/posembed_input/pos_embedding"]
    depth = len({key.split("/")[1] for key in t if key.startswith("Encoder/encoderblock_")})
    for i in range(depth):
        blk = f"Encoder/encoderblock_{i}"
        y = _ln(x, t[f"{blk}/LayerNorm_0/scale"], t[f"{blk}/LayerNorm_0/bias"])
        q, kk, v = (np.einsum("btd,dhe->bthe", y, t[f"{blk}/SelfAttention/{n}/kernel"]) + t[f"{blk}/SelfAttention/{n}/bias"]
                    for n in ("query", "key", "value"))
        q = q / np.sqrt(q.shape[-1])
        att = _softmax(np.einsum("bqhe,bshe->bhqs", q, kk))
        o = np.einsum("bhqs,bshe->bqhe", att, v)
        x = x + np.einsum("bqhe,hed->bqd", o, t[f"{blk}/SelfAttention/out/kernel"]) + t[f"{blk}/SelfAttention/out/bias"]
        y = _ln(x, t[f"{blk}/LayerNorm_1/scale"], t[f"{blk}/LayerNorm_1/bias"])
        if f"{blk}/Moe/Router/dense/kernel" in t:
            gates = _softmax(y @ t[f"{blk}/Moe/Router/dense/kernel"])  # [B, T, E]
            top = np.argsort(-gates, axis=-1, kind="stable")[..., :k]
            out = np.zeros_like(y)
            w0, b0 = t[f"{blk}/Moe/Mlp/Dense_0/kernel"], t[f"{blk}/Moe/Mlp/Dense_0/bias"]
            w1, b1 = t[f"{blk}/Moe/Mlp/Dense_1/kernel"], t[f"{blk}/Moe/Mlp/Dense_1/bias"]
            for e in range(gates.shape[-1]):
                weight = (gates[..., e] * (top == e).any(-1))[..., None]
                out = out + weight * (_gelu(y @ w0[e] + b0[e]) @ w1[e] + b1[e])
        else:
            out = _gelu(y @ t[f"{blk}/Mlp/Dense_0/kernel"] + t[f"{blk}/Mlp/Dense_0/bias"])
            out = out @ t[f"{blk}/Mlp/Dense_1/kernel"] + t[f"{blk}/Mlp/Dense_1/bias"]
        x = x + out
    x = _ln(x, t["Encoder/encoder_norm/scale"], t["Encoder/encoder_norm/bias"])
    pooled = x[:, 0] if "cls" in t else x.mean(1)
    if "pre_logits/kernel" in t:
        pooled = np.tanh(pooled @ t["pre_logits/kernel"] + t["pre_logits/bias"])
    return pooled @ t["head/kernel"] + t["head/bias"]
