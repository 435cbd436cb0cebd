"""Training and evaluation through Lightning: the ImageClassifier module, DataModules and the LightningCLI
commands. The names below are imported on first use, so a command living here (``vmoe flops``, ``vmoe
export``) pays for Lightning only when it needs it."""
from ..lazy import lazy_names

_NAMES = {"ImageClassifier": "vmoe.train.module", "warmup_decay_factor": "vmoe.train.schedule"}
__all__ = list(_NAMES)
__getattr__, __dir__ = lazy_names(__name__, _NAMES)
