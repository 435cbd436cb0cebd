"""vmoe: Vision Mixture-of-Experts on timm ViTs, trained with Lightning.

``import vmoe`` is light: the subpackages (``vmoe.moe``, ``vmoe.models``, ``vmoe.train``, ...) are imported on
first use, and vmoe's timm names are registered as soon as timm is imported (:mod:`vmoe.timm_hook`).
"""
from .lazy import lazy_names
from .timm_hook import register_when_timm_loads

__version__ = "0.1.0"

_SUBPACKAGES = ("moe", "distributed", "models", "train", "eval", "viz", "cli")
__all__ = ["__version__", *_SUBPACKAGES]
__getattr__, __dir__ = lazy_names(__name__, {name: f"{__name__}.{name}" for name in _SUBPACKAGES})

register_when_timm_loads()
