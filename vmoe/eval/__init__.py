"""Evaluation beyond the training metrics: few-shot linear evaluation of frozen features (V-MoE paper)."""
from .fewshot import (BIAS_COLUMN, REFERENCE_L2_GRID, LinearProbe, linear_probe_accuracies, linear_probe_accuracy,
                      mean_rank_choice, reference_shot_seed, shot_draw)
from .protocol import FewShotTask, evaluate_heldout, evaluate_mean_rank, format_fewshot_table

__all__ = ["BIAS_COLUMN", "REFERENCE_L2_GRID", "LinearProbe", "linear_probe_accuracies", "linear_probe_accuracy",
           "mean_rank_choice", "reference_shot_seed", "shot_draw", "FewShotTask", "evaluate_heldout",
           "evaluate_mean_rank", "format_fewshot_table"]
