"""Evaluation beyond the training metrics: few-shot linear evaluation of frozen features (V-MoE paper)."""
from .fewshot import (BIAS_COLUMN, REFERENCE_L2_GRID, LinearProbe, linear_probe_accuracies, linear_probe_accuracy,
                      mean_rank_choice, reference_shot_seed, shot_draw)

__all__ = ["BIAS_COLUMN", "REFERENCE_L2_GRID", "LinearProbe", "linear_probe_accuracies", "linear_probe_accuracy",
           "mean_rank_choice", "reference_shot_seed", "shot_draw"]
