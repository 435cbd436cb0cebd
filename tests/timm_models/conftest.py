import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # vmoe_names


def pytest_configure(config):
    for mark in ("base", "cfg", "torchscript", "features", "fxforward", "fxbackward", "timeout"):
        config.addinivalue_line("markers", f"{mark}: timm's test markers (vendored test_timm_models.py)")
