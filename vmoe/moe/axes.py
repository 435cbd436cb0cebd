"""The axis letters used in every shape in docstrings and comments of the package (docs/design.md,
"Axis letters", explains them with the algorithms).

Shapes are written like ``[G, S, K]``; a ``...`` stands for leading axes that are kept as they are.
"""
from __future__ import annotations

__all__ = ["AXES"]

AXES: dict[str, str] = {
    "B": "batch: images in the (local) batch",
    "T": "tokens per image: patches plus prefix tokens such as CLS",
    "G": "routing groups: B*T tokens are cut into G groups of S consecutive tokens, routed independently",
    "S": "tokens per routing group (group_size; default B*T, the whole local batch)",
    "E": "experts of an MoE block (E' = m*E after fine-grained segmentation into m)",
    "K": "expert choices per token (top-k; K' = m*K after segmentation; K = E for dense and expert choice)",
    "C": "capacity: slots per expert per routing group",
    "D": "model width (tokens in and out of a block)",
    "H": "hidden width of one expert MLP",
    "A": "kept assignments: the (token, choice) pairs that got a slot, the rows the experts compute",
}
