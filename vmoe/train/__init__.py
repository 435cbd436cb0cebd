"""Training and evaluation through Lightning: the ImageClassifier module, DataModules and the `vmoe` CLI."""
from .module import ImageClassifier, build_network
from .schedule import warmup_decay_factor

__all__ = ["ImageClassifier", "build_network", "warmup_decay_factor"]
