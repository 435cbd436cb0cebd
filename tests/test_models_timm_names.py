"""One table of timm names, one weights filter: every registered name comes from TIMM_NAMES, and "V-MoE or
dense weights?" is decided in one module for every way a V-MoE starts from weights."""
import re
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import vmoe.models  # noqa: F401  (registers the names)
from vmoe.models import TIMM_NAMES
from vmoe.models.checkpoint import holds_experts

PACKAGE = Path(__file__).resolve().parents[1] / "vmoe"
TINY = dict(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10, moe_layers=[1])


def test_every_registered_name_is_an_entry_of_the_table():
    assert set(timm.list_models(module="timm_names")) == set(TIMM_NAMES)
    assert {"vmoe", "vmoe_vit_prelogits", "vmoe_reference", "vmoe_timm_s16_e8_every2",
            "vmoe_paper_s32_e8_last2", "e3_paper_s32_e8_m2_last2"} <= set(TIMM_NAMES)


def test_the_weights_decision_lives_in_one_module():
    deciding = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                      if re.search(r"""["']\.experts\.["'] in key for key in""", p.read_text()))
    assert deciding == ["models/checkpoint.py"]  # holds_experts; the policy is starting_weights.starting_state_dict


@pytest.mark.parametrize("name, extra", [("vmoe", dict(backbone="vit_tiny_patch16_224")),
                                         ("vmoe_timm_ti16_e8_every2", {}), ("vmoe_paper_s32_e8_last2", {})])
def test_every_vmoe_name_upcycles_dense_and_fine_tunes_vmoe_weights(name, extra, tmp_path):
    kwargs = dict(TINY, **extra)
    model = timm.create_model(name, **kwargs)
    dense = {k: v for k, v in model.state_dict().items() if ".mlp." not in k}
    mlp = model.blocks[1].mlp
    dense.update({"blocks.1.mlp.fc1.weight": torch.randn(mlp.experts.fc1_weight.shape[1:]),
                  "blocks.1.mlp.fc1.bias": torch.randn(mlp.experts.fc1_weight.shape[1]),
                  "blocks.1.mlp.fc2.weight": torch.randn(mlp.experts.fc2_weight.shape[1:]),
                  "blocks.1.mlp.fc2.bias": torch.randn(mlp.experts.fc2_weight.shape[1])})
    dense.update({f"blocks.0.mlp.{k}": v for k, v in model.blocks[0].mlp.state_dict().items()})
    assert not holds_experts(dense)
    save_file(dense, tmp_path / "dense.safetensors")
    up = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "dense.safetensors")),
                           **kwargs)
    assert torch.equal(up.blocks[1].mlp.experts.fc1_weight[3], dense["blocks.1.mlp.fc1.weight"])

    save_file(up.state_dict(), tmp_path / "vmoe.safetensors")
    overlay = dict(file=str(tmp_path / "vmoe.safetensors"))
    tuned = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **dict(kwargs, num_classes=3))
    assert torch.equal(tuned.blocks[1].mlp.experts.fc1_weight, up.blocks[1].mlp.experts.fc1_weight)
    assert tuned.head.weight.shape[0] == 3  # another class count: the head starts fresh
    with pytest.raises(ValueError, match="already a V-MoE"):
        timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, expert_noise=0.1, **kwargs)


@pytest.mark.parametrize("code", ["import vmoe, timm", "import timm, vmoe", "import vmoe.moe, timm"])
def test_import_vmoe_registers_the_names_whenever_timm_comes(code):
    import subprocess
    import sys

    check = (f"{code}; import sys; assert timm.is_model('vmoe_timm_s16_e8_every2') and timm.is_model('vmoe'); "
             "print(sorted(m for m in ('torch', 'timm') if m in sys.modules))")
    env = {"PYTHONPATH": str(PACKAGE.parent), "PATH": ""}
    proc = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    light = subprocess.run([sys.executable, "-c", "import vmoe, sys; print('timm' in sys.modules, 'torch' in sys.modules)"],
                           capture_output=True, text=True, env=env, timeout=300)
    assert light.stdout.split() == ["False", "False"], light.stderr  # import vmoe alone stays light
