"""vmoe: Vision Mixture-of-Experts on timm ViTs, trained with Lightning."""
__version__ = "0.1.0"

from . import moe  # noqa: E402

try:  # the models register their timm names on import
    from . import models  # noqa: F401,E402
except ImportError as err:  # pragma: no cover - only while the package is incomplete
    if "vmoe.models" not in str(err) and "create_vmoe" not in str(err):
        raise
