"""Training and evaluation through Lightning: the ImageClassifier module, DataModules and the `vmoe` CLI."""
from .module import ImageClassifier
from .schedule import warmup_decay_factor

__all__ = ["ImageClassifier", "warmup_decay_factor"]
