"""Every timm name vmoe registers: one table (:data:`TIMM_NAMES`), one ``_create``, one weights filter.

Importing this module registers the names with timm (``import vmoe.models`` does; so does ``import vmoe``
as soon as timm is imported). Adding a name is one entry of the table.

- ``vmoe_timm_*``: timm's ViT-Ti/S/B/L shapes (e.g. ViT-S = 384 wide, 12 blocks) with MoE blocks, for sparse
  upcycling: their pretrained_cfg points at timm's dense augreg weights, upcycled while loading
  (``pretrained=True``; ``pretrained_cfg_overlay=dict(file=...)`` for a local file).
- ``vmoe_paper_*``, ``e3_paper_*``: the V-MoE paper's own architectures (Riquelme et al. 2021, Table 8; the
  reference's configs), not timm's: V-MoE-S is 512 wide with 8 blocks.

  | size | width D | blocks | heads | MLP H | patch |
  |---|---|---|---|---|---|
  | S/32 | 512 | 8 | 8 | 2048 | 32 |
  | B/32, B/16 | 768 | 12 | 12 | 3072 | 32, 16 |
  | L/16 | 1024 | 24 | 16 | 4096 | 16 |
  | H/14 | 1280 | 32 | 16 | 5120 | 14 |

  GELU with the tanh approximation, LayerNorm eps 1e-6, a class token, 224 px and 1000 classes by default
  (``representation_size`` adds a pre-logits layer); the V-MoE router (K=2; E³: K=1). The routing group
  size is the caller's (``group_size``; the reference uses 8 images' tokens per group). The released
  checkpoints are pretrained tags of these names (``vmoe_paper_s32_e8_last2.ilsvrc2012_randaug_light1``, ...:
  :mod:`vmoe.models.timm_names`) that bring the checkpoint's image size, classes, representation layer and routing.
- ``vmoe_reference``: any architecture, every ViT and MoE argument given by the caller (what ``vmoe convert``
  writes).
- ``vmoe``: a V-MoE on any timm ViT ``backbone=`` (what :func:`save_pretrained` names a create_vmoe model).
- ``vmoe_vit_prelogits``: a dense ViT with the original representation layer (a backbone for the above).

Every V-MoE name takes any ViT kwarg, the MoE settings of :class:`vmoe.moe.MoEConfig` (moe_layers,
num_experts, k, capacity_factor, ...) and ``expert_noise`` / ``router_init_std`` for upcycling. Weights given
with ``pretrained=True`` go through one filter (:func:`vmoe.models.starting_weights.starting_state_dict`):
V-MoE weights are adapted for fine-tuning (position embedding resampled, a head of another size reset), dense
ViT weights are upcycled.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
import os
from pathlib import Path
from typing import Any, Callable

import timm
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .naming import GENERIC_NAME, record_input_size
from .vit_prelogits import PreLogitsViT

__all__ = ["TimmName", "TIMM_NAMES", "UPCYCLE_FROM", "Release", "RELEASES", "release_of_checkpoint", "release_of_tag"]

# The ViT classes an entry is built on; "any" is timm.create_model(backbone=...) of the caller's backbone.
VIT = "vit"  # timm's VisionTransformer
PRELOGITS = "prelogits"  # PreLogitsViT: timm's ViT plus the optional representation layer
ANY = "any"


@dataclass(frozen=True)
class TimmName:
    """One registered name: ``vit`` arguments and ``moe`` defaults (the caller's kwargs override both; moe None
    = a dense ViT), the ViT class (``backbone``: VIT, PRELOGITS or ANY), pretrained_cfg fields on top of
    :data:`_BASE_CFG` (``description`` defaults to ``doc``), and ``upcycle_from``: timm dense weights
    ("arch.tag") that ``pretrained=True`` fetches from the hub and upcycles."""

    doc: str
    vit: dict[str, Any] = field(default_factory=dict)
    moe: dict[str, Any] | None = None
    backbone: str = PRELOGITS
    cfg: dict[str, Any] = field(default_factory=dict)
    upcycle_from: str | None = None


_BASE_CFG = dict(num_classes=1000, input_size=(3, 224, 224), pool_size=None, crop_pct=1.0,
                 interpolation="bilinear", fixed_input_size=True, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                 first_conv="patch_embed.proj", classifier="head", license="apache-2.0", paper_ids="arXiv:2106.05974")
_TIMM_TAG = "augreg_in21k_ft_in1k"


def _timm_shaped(doc: str, patch: int, dim: int, depth: int, heads: int, moe_layers: str, dense: str) -> TimmName:
    # K=2 is the vmoe router's default, left unset so that another router=... keeps its own.
    return TimmName(f"{doc}; upcycles timm's dense augreg weights.", backbone=VIT,
                    vit=dict(patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads),
                    moe=dict(moe_layers=moe_layers, num_experts=8), cfg=dict(crop_pct=0.9, interpolation="bicubic"),
                    upcycle_from=f"{dense}.{_TIMM_TAG}")


_LOCAL_FILE = dict(description="weights from a local file (vmoe convert)")
_PAPER_SIZES = {"s": (512, 8, 8), "b": (768, 12, 12), "l": (1024, 24, 16), "h": (1280, 32, 16)}


def _paper(size: str, patch: int, **moe: Any) -> TimmName:
    dim, depth, heads = _PAPER_SIZES[size]
    vit = dict(patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=4.0, act_layer="gelu_tanh",
               qkv_bias=True, class_token=True, global_pool="token", fc_norm=False)
    return TimmName(f"ViT {vit} with MoE {moe}.", vit=vit, moe=moe, cfg=_LOCAL_FILE)


TIMM_NAMES: dict[str, TimmName] = {
    "vmoe_timm_ti16_e8_every2": _timm_shaped("ViT-Ti/16 (timm), 8 experts, K=2, MoE in every 2nd block",
                                             16, 192, 12, 3, "every-2", "vit_tiny_patch16_224"),
    "vmoe_timm_s16_e8_every2": _timm_shaped("ViT-S/16 (timm: 384 wide, 12 blocks), 8 experts, K=2, MoE in every 2nd "
                                            "block", 16, 384, 12, 6, "every-2", "vit_small_patch16_224"),
    "vmoe_timm_s32_e8_last2": _timm_shaped("ViT-S/32 (timm: 384 wide, 12 blocks), 8 experts, K=2, MoE in the last 2 "
                                           "odd blocks", 32, 384, 12, 6, "last-2", "vit_small_patch32_224"),
    "vmoe_timm_b16_e8_every2": _timm_shaped("ViT-B/16 (timm), 8 experts, K=2, MoE in every 2nd block",
                                            16, 768, 12, 12, "every-2", "vit_base_patch16_224"),
    "vmoe_timm_b32_e8_last2": _timm_shaped("ViT-B/32 (timm), 8 experts, K=2, MoE in the last 2 odd blocks",
                                           32, 768, 12, 12, "last-2", "vit_base_patch32_224"),
    "vmoe_timm_l16_e8_every2": _timm_shaped("ViT-L/16 (timm), 8 experts, K=2, MoE in every 2nd block",
                                            16, 1024, 24, 16, "every-2", "vit_large_patch16_224"),
    "vmoe_paper_s32_e8_last2": _paper("s", 32, moe_layers="last-2", num_experts=8, k=2),
    "vmoe_paper_b32_e32_every2": _paper("b", 32, moe_layers="every-2", num_experts=32, k=2),
    "vmoe_paper_b16_e8_every2": _paper("b", 16, moe_layers="every-2", num_experts=8, k=2),
    "vmoe_paper_l16_e32_every2": _paper("l", 16, moe_layers="every-2", num_experts=32, k=2),
    "vmoe_paper_h14_e32_every2": _paper("h", 14, moe_layers="every-2", num_experts=32, k=2),
    "e3_paper_s32_e8_m2_last2": _paper("s", 32, moe_layers="last-2", num_experts=8, k=1, router="ensemble",
                                       moe_kwargs={"ensemble_size": 2}),
    "vmoe_reference": TimmName("Any V-MoE architecture: every ViT and MoE argument given by the caller (vmoe convert).",
                               vit=dict(act_layer="gelu_tanh", fc_norm=False),
                               moe=dict(moe_layers="every-2", num_experts=8), cfg=_LOCAL_FILE),
    GENERIC_NAME: TimmName("A V-MoE on any timm ViT ``backbone`` (default vit_small_patch16_224): kwargs are the "
                           "backbone's, the MoE settings and expert_noise / router_init_std for upcycling; what "
                           "save_pretrained names a create_vmoe model.", backbone=ANY, moe={},
                           cfg=dict(crop_pct=0.9, interpolation="bicubic",
                                    description="V-MoE on any timm ViT backbone (model_args: backbone + MoE settings)")),
    "vmoe_vit_prelogits": TimmName("A dense timm ViT (any VisionTransformer kwargs) with an optional "
                                   "``representation_size``.",
                                   cfg=dict(paper_ids=None, description="ViT with the original representation "
                                                                        "layer; weights only from a local file")),
}
# name -> the timm dense weights ("arch.tag") it upcycles from (the vmoe_timm_* names)
UPCYCLE_FROM = {name: entry.upcycle_from for name, entry in TIMM_NAMES.items() if entry.upcycle_from}
_UPCYCLE_ARGS = ("expert_noise", "router_init_std")

# --- The released checkpoints (gs://vmoe_checkpoints/<name>) as pretrained tags of the paper names -----------
# The checkpoints released with the V-MoE and E³ papers (``gs://vmoe_checkpoints/<name>``) as timm pretrained
# tags of the paper architectures, with the settings of the reference configs that trained and evaluated them.
#
# ``timm.create_model("vmoe_paper_s32_e8_last2.ilsvrc2012_randaug_light1", pretrained=True,
# pretrained_cfg_overlay=dict(file="converted/light1/model.safetensors"))`` builds exactly that checkpoint's
# architecture (image size, classes, representation layer) with its routing (group size, capacity factors,
# bfloat16 dispatch) and loads the file ``vmoe convert`` wrote strictly. ``vmoe convert`` and ``load_reference``
# take the same routing defaults when a checkpoint's file name is a release name.
#
# Sources (github.com/google-research/vmoe at 942a78b): ``vmoe/configs/vmoe_paper/common.py`` (representation =
# width for training from scratch, group = 8 images' tokens, bfloat16 dispatch, capacity 1.05),
# ``vmoe_s32_last2_ilsvrc2012_randaug_light1.py`` (eval capacity 4.0), ``..._light1_ft_ilsvrc2012.py`` and
# ``vmoe_b16_imagenet21k_randaug_strong_ft_ilsvrc2012.py`` (384 px, no representation, capacity 1.5),
# ``pretrain_imagenet21k.py`` (21,843 classes, no representation), ``eee_paper/eee_s32_last2_ilsvrc2012_ft_cifar100.py``
# (128 px, 100 classes, representation 512, 128 images' tokens x 2 members per group, capacity 1.5; it restores
# ``pre_logits`` from ``eee_s32_last2_ilsvrc2012``). ``..._randaug_medium`` and ``eee_s32_last2_ilsvrc2012`` have
# no config released: the former takes light1's settings (the same recipe, 1000 epochs), the latter the E³
# fine-tuning config's routing at 224 px / 1000 classes with 8 images per group.


@dataclass(frozen=True)
class Release:
    """One released checkpoint: its paper architecture (a registry name) and what its config sets."""

    checkpoint: str
    architecture: str
    tag: str
    patch_size: int
    img_size: int
    num_classes: int
    representation_size: int | None
    capacity_factor: float
    eval_capacity_factor: float | None = None  # None: the training factor
    images_per_group: int = 8
    ensemble_size: int = 1
    config: str = ""  # the reference config it comes from ("" = none released)

    @property
    def timm_name(self) -> str:
        return f"{self.architecture}.{self.tag}"

    @property
    def group_size(self) -> int:
        """Routing rows per group: images x tokens per image (x members for E³), as the reference computes it."""
        tokens = (self.img_size // self.patch_size) ** 2 + 1
        return self.images_per_group * tokens * self.ensemble_size

    def routing(self) -> dict[str, Any]:
        """The routing settings (``load_reference`` / ``vmoe convert`` keywords) of the release's config."""
        return dict(group_size=self.group_size, capacity_factor=self.capacity_factor,
                    eval_capacity_factor=self.eval_capacity_factor, bfloat16_dispatch=True)

    def model_defaults(self) -> dict[str, Any]:
        """Keyword defaults of the registry name for this release (the caller's keywords override them)."""
        return dict(representation_size=self.representation_size, group_size=self.group_size,
                    capacity_factor=self.capacity_factor, eval_capacity_factor=self.eval_capacity_factor,
                    bfloat16_dispatch=True)

    def convert_command(self) -> str:
        """The ``vmoe convert`` command that writes converted/<checkpoint> with this release's routing."""
        flags = f"--group_size {self.group_size} --capacity_factor {self.capacity_factor}"
        if self.eval_capacity_factor is not None:
            flags += f" --eval_capacity_factor {self.eval_capacity_factor}"
        if self.ensemble_size > 1:
            flags += f" --ensemble_size {self.ensemble_size}"
        return f"vmoe convert ckpts/{self.checkpoint} --out converted/{self.checkpoint} {flags} --bfloat16_dispatch true"

    def load_line(self) -> str:
        """The Python line that loads what :meth:`convert_command` wrote, through this release's timm tag."""
        return (f'timm.create_model("{self.timm_name}", pretrained=True, '
                f'pretrained_cfg_overlay=dict(file="converted/{self.checkpoint}/model.safetensors")).eval()')

    def pretrained_cfg(self) -> dict[str, Any]:
        source = f"from {self.config}" if self.config else "no config released (see vmoe.models.timm_names)"
        return dict(num_classes=self.num_classes, input_size=(3, self.img_size, self.img_size), pool_size=None,
                    crop_pct=1.0, interpolation="bilinear", fixed_input_size=True, mean=(0.5, 0.5, 0.5),
                    std=(0.5, 0.5, 0.5), first_conv="patch_embed.proj", classifier="head", license="apache-2.0",
                    paper_ids="arXiv:2106.05974", hf_hub_id=None,
                    description=f"gs://vmoe_checkpoints/{self.checkpoint} (vmoe convert it, then pass the file as "
                                f"pretrained_cfg_overlay=dict(file=...)); settings {source}")


_S, _B, _E3 = "vmoe_paper_s32_e8_last2", "vmoe_paper_b16_e8_every2", "e3_paper_s32_e8_m2_last2"
RELEASES: dict[str, Release] = {r.checkpoint: r for r in [
    Release("vmoe_s32_last2_ilsvrc2012_randaug_light1", _S, "ilsvrc2012_randaug_light1", 32, 224, 1000, 512, 1.05,
            4.0, config="vmoe_paper/vmoe_s32_last2_ilsvrc2012_randaug_light1.py"),
    Release("vmoe_s32_last2_ilsvrc2012_randaug_light1_ft_ilsvrc2012", _S, "ilsvrc2012_randaug_light1_ft_ilsvrc2012",
            32, 384, 1000, None, 1.5, config="vmoe_paper/vmoe_s32_last2_ilsvrc2012_randaug_light1_ft_ilsvrc2012.py"),
    Release("vmoe_s32_last2_ilsvrc2012_randaug_medium", _S, "ilsvrc2012_randaug_medium", 32, 224, 1000, 512, 1.05,
            4.0),
    Release("vmoe_b16_imagenet21k_randaug_strong", _B, "imagenet21k_randaug_strong", 16, 224, 21843, None, 1.05,
            config="vmoe_paper/pretrain_imagenet21k.py"),
    Release("vmoe_b16_imagenet21k_randaug_strong_ft_ilsvrc2012", _B, "imagenet21k_randaug_strong_ft_ilsvrc2012", 16,
            384, 1000, None, 1.5, config="vmoe_paper/vmoe_b16_imagenet21k_randaug_strong_ft_ilsvrc2012.py"),
    Release("eee_s32_last2_ilsvrc2012", _E3, "ilsvrc2012", 32, 224, 1000, 512, 1.5, ensemble_size=2),
    Release("eee_s32_last2_ilsvrc2012_ft_cifar100", _E3, "ilsvrc2012_ft_cifar100", 32, 128, 100, 512, 1.5,
            images_per_group=128, ensemble_size=2, config="eee_paper/eee_s32_last2_ilsvrc2012_ft_cifar100.py"),
]}
_BY_TAG = {(r.architecture, r.tag): r for r in RELEASES.values()}


def release_of_checkpoint(prefix: str | os.PathLike | None) -> Release | None:
    """The release a checkpoint prefix (or its folder) is named after, else None."""
    return None if prefix is None else RELEASES.get(Path(prefix).name)


def release_of_tag(architecture: str, tag: Any) -> Release | None:
    """The release a registry name + pretrained tag stands for (None for other tags or a cfg dict)."""
    return _BY_TAG.get((architecture, tag)) if isinstance(tag, str) else None




def _pretrained_cfg(name: str, entry: TimmName) -> tuple[str, dict[str, Any]]:
    """(timm's "name.tag" key, pretrained_cfg) of one entry."""
    cfg = {**_BASE_CFG, "description": entry.doc, **entry.cfg}
    if entry.moe is not None and entry.backbone == PRELOGITS:
        cfg["description"] = f"{name}: {cfg['description']}"
    if entry.upcycle_from is None:
        return name, {key: value for key, value in cfg.items() if value is not None}
    dense = entry.upcycle_from
    cfg.update(hf_hub_id=f"timm/{dense}", description=f"V-MoE sparse-upcycled at load time from timm's dense {dense}",
               notes=(f"upcycle_from={dense}",))
    return f"{name}.{dense.partition('.')[2]}", cfg  # the tag of the dense weights


# Each name's own cfg first (its default), then the released checkpoints as tags of their paper architecture.
default_cfgs = generate_default_cfgs({**dict(_pretrained_cfg(name, entry) for name, entry in TIMM_NAMES.items()),
                                      **{r.timm_name: r.pretrained_cfg() for r in RELEASES.values()}})


def _vit_class(entry: TimmName, backbone: str | None) -> Callable[..., nn.Module]:
    if entry.backbone == ANY:
        return functools.partial(timm.create_model, backbone, pretrained=False)
    return VisionTransformer if entry.backbone == VIT else PreLogitsViT


def _build(vit_class: Callable[..., nn.Module], moe: Any, **vit_kwargs: Any) -> nn.Module:
    from .build import convert_to_moe  # imported when a model is built: registering the names needs timm only

    return convert_to_moe(vit_class(**vit_kwargs), moe)


def _weights_filter(state_dict: dict, model: nn.Module, upcycle_kwargs: dict[str, Any]) -> dict:
    """timm's pretrained filter for every V-MoE name: one decision, V-MoE or dense weights."""
    from .starting_weights import starting_state_dict

    try:
        return starting_state_dict(state_dict, model, upcycle_kwargs, source="the pretrained weights")
    except TypeError as err:  # timm would retry a TypeError-raising filter with one argument
        raise RuntimeError(f"upcycling the pretrained weights failed: {err}") from err


def _with_release(name: str, entry: TimmName, tag: Any) -> TimmName:
    """``entry`` with the defaults of the released checkpoint that ``tag`` names (representation layer, routing)."""
    release = release_of_tag(name, tag)
    if release is None:
        return entry
    extra = release.model_defaults()
    vit = {**entry.vit, "representation_size": extra.pop("representation_size")}
    return dataclasses.replace(entry, vit=vit, moe={**(entry.moe or {}), **extra})


def _create(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Build ``name`` of TIMM_NAMES with timm's builder (pretrained_cfg, features_only, pretrained loading);
    a released checkpoint's tag (``vmoe.models.timm_names``) brings that checkpoint's defaults."""
    entry = _with_release(name, TIMM_NAMES[name], kwargs.get("pretrained_cfg"))
    backbone = kwargs.pop("backbone", "vit_small_patch16_224") if entry.backbone == ANY else None
    feature_cfg = dict(out_indices=kwargs.pop("out_indices", 3), feature_cls="getter")
    if entry.moe is None:
        return record_input_size(build_model_with_cfg(_vit_class(entry, backbone), name, pretrained,
                                                      feature_cfg=feature_cfg, **{**entry.vit, **kwargs}))
    from ..moe import MoEConfig

    upcycle_kwargs = {key: kwargs.pop(key) for key in _UPCYCLE_ARGS if key in kwargs}
    moe, kwargs = MoEConfig.split(kwargs, defaults=entry.moe)
    return record_input_size(build_model_with_cfg(
        functools.partial(_build, _vit_class(entry, backbone), moe), name, pretrained,
        pretrained_filter_fn=functools.partial(_weights_filter, upcycle_kwargs=upcycle_kwargs),
        feature_cfg=feature_cfg, **{**entry.vit, **kwargs}))


def _entrypoint(name: str) -> Callable[..., nn.Module]:
    def entry(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return _create(name, pretrained, **kwargs)

    entry.__name__ = entry.__qualname__ = name
    entry.__module__ = __name__
    entry.__doc__ = TIMM_NAMES[name].doc
    return entry


for _name in TIMM_NAMES:
    globals()[_name] = register_model(_entrypoint(_name))
