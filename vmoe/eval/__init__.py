"""Evaluation beyond the training metrics: few-shot linear evaluation of frozen features (V-MoE paper)."""
from .fewshot import (DEFAULT_L2_GRID, draw_shots, fewshot_evaluate, format_fewshot_table, pm1_targets, ridge_fit,
                      ridge_predict, select_l2)

__all__ = ["DEFAULT_L2_GRID", "draw_shots", "fewshot_evaluate", "format_fewshot_table", "pm1_targets", "ridge_fit",
           "ridge_predict", "select_l2"]
