"""vmoe: Vision Mixture-of-Experts on timm ViTs, trained with Lightning."""
__version__ = "0.1.0"

from . import models, moe  # noqa: E402,F401  (models registers the timm names)
