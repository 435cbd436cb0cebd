"""The architecture of a JAX V-MoE / E³ checkpoint, read from the shapes of its arrays.

Nothing the weights already say is asked of the user: patch size, width, depth, heads, MLP width, which
blocks are MoE and their expert counts, the ensemble size (3-D router kernel), class token or ``gap``,
the representation layer, the classes and the image size (from the position embedding).
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import numpy as np

__all__ = ["ReferenceArchitecture", "infer_architecture"]

_BLOCK = re.compile(r"^Encoder/encoderblock_(\d+)/")


@dataclass(frozen=True)
class ReferenceArchitecture:
    """What a reference checkpoint's tree says about its model.

    moe_layers: block indices with an MoE MLP; num_experts: E per MoE block (in block order);
    ensemble_size: M (1 for a plain V-MoE); classifier: "token" (class token) or "gap" (mean of the
    normed tokens); representation_size: width of ``pre_logits`` or None; img_size: square grid x patch.
    """

    patch_size: int
    in_chans: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_dim: int
    moe_layers: tuple[int, ...]
    num_experts: tuple[int, ...]
    ensemble_size: int
    classifier: str
    representation_size: int | None
    num_classes: int
    img_size: int

    def timm_kwargs(self) -> dict[str, Any]:
        """Arguments of :class:`vmoe.models.vit.PreLogitsViT` (timm VisionTransformer) for this model."""
        token = self.classifier == "token"
        return dict(img_size=self.img_size, patch_size=self.patch_size, in_chans=self.in_chans,
                    embed_dim=self.embed_dim, depth=self.depth, num_heads=self.num_heads,
                    mlp_ratio=self.mlp_dim / self.embed_dim, qkv_bias=True, class_token=token,
                    global_pool="token" if token else "avg", fc_norm=False, act_layer="gelu_tanh",
                    representation_size=self.representation_size, num_classes=self.num_classes)

    def to_dict(self) -> dict[str, Any]:
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}


def _shape(arrays: Mapping[str, np.ndarray], key: str) -> tuple[int, ...]:
    if key not in arrays:
        raise ValueError(f"the checkpoint has no {key!r}; is it a V-MoE (ViT) params tree? "
                         f"top-level keys: {sorted({k.split('/')[0] for k in arrays})}")
    return tuple(arrays[key].shape)


def infer_architecture(arrays: Mapping[str, np.ndarray]) -> ReferenceArchitecture:
    """Read the architecture from a reference params tree ({flax path: array})."""
    p1, p2, in_chans, dim = _shape(arrays, "embedding/kernel")
    if p1 != p2:
        raise ValueError(f"non-square patches {p1}x{p2} are not supported")
    blocks = sorted({int(m.group(1)) for key in arrays if (m := _BLOCK.match(key))})
    if not blocks or blocks != list(range(len(blocks))):
        raise ValueError(f"encoder blocks must be numbered 0..L-1, found {blocks}")
    _, heads, head_dim = _shape(arrays, "Encoder/encoderblock_0/SelfAttention/query/kernel")
    if heads * head_dim != dim:
        raise ValueError(f"query kernel [D={dim}, h={heads}, d={head_dim}] does not match the width")
    moe_layers, experts, ensemble, mlp_dims = [], [], set(), set()
    for i in blocks:
        base = f"Encoder/encoderblock_{i}"
        if f"{base}/Moe/Mlp/Dense_0/kernel" in arrays:
            e, _, hidden = _shape(arrays, f"{base}/Moe/Mlp/Dense_0/kernel")
            router = _shape(arrays, f"{base}/Moe/Router/dense/kernel")
            members = router[1] if len(router) == 3 else 1
            if int(np.prod(router[1:])) != e:
                raise ValueError(f"{base}: router kernel {router} does not match {e} experts")
            moe_layers.append(i), experts.append(e), ensemble.add(members), mlp_dims.add(hidden)
        else:
            mlp_dims.add(_shape(arrays, f"{base}/Mlp/Dense_0/kernel")[1])
    if len(mlp_dims) != 1 or len(ensemble) > 1:
        raise ValueError(f"blocks disagree: MLP widths {sorted(mlp_dims)}, ensemble sizes {sorted(ensemble)}")
    token = "cls" in arrays
    tokens = _shape(arrays, "Encoder/posembed_input/pos_embedding")[1] - int(token)
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise ValueError(f"the position embedding holds {tokens} patch positions, not a square grid")
    representation = _shape(arrays, "pre_logits/kernel")[1] if "pre_logits/kernel" in arrays else None
    return ReferenceArchitecture(
        patch_size=p1, in_chans=in_chans, embed_dim=dim, depth=len(blocks), num_heads=heads,
        mlp_dim=mlp_dims.pop(), moe_layers=tuple(moe_layers), num_experts=tuple(experts),
        ensemble_size=ensemble.pop() if ensemble else 1, classifier="token" if token else "gap",
        representation_size=representation, num_classes=_shape(arrays, "head/kernel")[1], img_size=grid * p1)
