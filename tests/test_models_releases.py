"""Each released checkpoint is a timm tag of its paper architecture that builds exactly what `vmoe convert`
writes for it (architecture and routing) and, with the converted file as the overlay, computes what
load_reference computes."""
import pytest
import timm
import torch

from reference_writer import random_tree, write_checkpoint
from vmoe.models import create_vmoe, load_reference
from vmoe.models.jax_checkpoint import ReferenceArchitecture, reference_model_config
from vmoe.models.timm_names import RELEASES, release_of_checkpoint
from vmoe.moe import iter_moe_mlps
from vmoe.cli import main

# The paper's sizes (width, depth, heads, MLP) and MoE blocks of each architecture the releases use.
PAPER = {"vmoe_paper_s32_e8_last2": ((512, 8, 8, 2048), (5, 7)),
         "vmoe_paper_b16_e8_every2": ((768, 12, 12, 3072), (1, 3, 5, 7, 9, 11)),
         "e3_paper_s32_e8_m2_last2": ((512, 8, 8, 2048), (5, 7))}


def _architecture(release, dim=None, depth=None, heads=None, mlp=None):
    (d, n, h, m), moe = PAPER[release.architecture]
    return ReferenceArchitecture(
        patch_size=release.patch_size, in_chans=3, embed_dim=dim or d, depth=depth or n, num_heads=heads or h,
        mlp_dim=mlp or m, moe_layers=moe, num_experts=(8,) * len(moe), ensemble_size=release.ensemble_size,
        classifier="token", representation_size=release.representation_size, num_classes=release.num_classes,
        img_size=release.img_size)


def _settings(model):
    return [(name, type(layer).__name__, layer.settings, getattr(layer, "ensemble_size", 1))
            for name, layer in iter_moe_mlps(model)]


@pytest.mark.parametrize("release", RELEASES.values(), ids=list(RELEASES))
def test_the_tag_builds_what_convert_writes_for_the_release(release):
    with torch.device("meta"):  # full size, no memory
        model = timm.create_model(release.timm_name)
        converted = create_vmoe(**reference_model_config(_architecture(release), **release.routing()))
    assert {k: v.shape for k, v in model.state_dict().items()} == {
        k: v.shape for k, v in converted.state_dict().items()}
    assert _settings(model) == _settings(converted) and _settings(model)
    assert model.pretrained_cfg["input_size"] == (3, release.img_size, release.img_size)
    assert timm.data.resolve_data_config(model=model)["mean"] == (0.5, 0.5, 0.5)
    assert release_of_checkpoint(f"ckpts/{release.checkpoint}") is release


@pytest.mark.parametrize("name", ["vmoe_s32_last2_ilsvrc2012_randaug_light1", "eee_s32_last2_ilsvrc2012_ft_cifar100"])
def test_pretrained_with_the_converted_file_gives_load_references_outputs(tmp_path, monkeypatch, name, capsys):
    release = RELEASES[name]
    small = dict(dim=16, depth=8, heads=2, mlp=32)  # the release's image size, classes and head; a tiny trunk
    tree = random_tree(patch=release.patch_size, img=release.img_size, moe_layers=PAPER[release.architecture][1],
                       experts=8, ensemble=release.ensemble_size, classes=release.num_classes,
                       representation=release.representation_size, **small)
    (tmp_path / "ckpts").mkdir()
    write_checkpoint(tmp_path / "ckpts" / name, tree)
    monkeypatch.chdir(tmp_path)
    assert main(release.convert_command().split()[1:]) == 0
    assert release.timm_name in capsys.readouterr().out  # convert says how to load it
    model = timm.create_model(release.timm_name, pretrained=True, embed_dim=16, num_heads=2, mlp_ratio=2.0,
                              pretrained_cfg_overlay=dict(file=f"converted/{name}/model.safetensors")).eval()
    source = load_reference(f"ckpts/{name}", **release.routing())
    batch = release.group_size // release.ensemble_size // ((release.img_size // release.patch_size) ** 2 + 1)
    x = torch.rand(batch, 3, release.img_size, release.img_size) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x))
    assert _settings(model) == _settings(source)
