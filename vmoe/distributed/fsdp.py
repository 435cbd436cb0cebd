"""Expert parallelism with the dense part sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``), no DDP.

Select it like the DDP variant: ``trainer.strategy: fsdp_expert_parallel`` (CLI, once vmoe.distributed.fsdp
is imported) or ``{class_path: vmoe.distributed.ExpertParallelFSDPStrategy, init_args: {...}}``.

- setup: the experts of every MoE layer are sharded over the expert-parallel ranks (``shard_experts``, rank
  0's weights), the dense weights are broadcast from rank 0, then ``fully_shard`` is applied to every
  transformer block (default: each module of an ``nn.Sequential``/``nn.ModuleList`` named ``blocks``, as in
  timm's ViT) and to the LightningModule, with the expert parameters as ``ignored_params``: they stay
  plain local tensors, reached by all-to-all. The optimizer is built afterwards, on the DTensor shards.
- gradients: FSDP2 reduce-scatters the dense gradients (mean over the W ranks); ``sync_expert_grads`` turns
  the expert gradients into the same mean. Norm clipping uses the norm of the whole model, the same on
  every rank (``vmoe.distributed.clip_grad_norm_`` sums the DTensor shards over the mesh).
- checkpoints (``state_dict_type="full"``, the default) hold plain full tensors: dense parameters and optimizer moments are all-gathered
  (``DTensor.full_tensor``), experts gathered from their group, in the layout of ``model.state_dict()`` /
  ``optimizer.state_dict()`` of one process. They load with plain ``load_state_dict`` in one process, and
  back into this strategy (dense parts re-sharded, experts re-sliced; tested 2 ranks -> 2 ranks).
  ``state_dict_type="sharded"``: a DCP directory of FSDP2's dense shards and each rank's expert slices
  (vmoe.distributed.dcp), nothing gathered.
- precision: "32-true" or "bf16-mixed" (autocast; float32 parameters, gradients and optimizer state);
  anything else raises ValueError at the start of setup.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.overrides.distributed import _sync_module_states
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.optim import Optimizer

from .shard import (expert_parameters, gather_expert_state_dict, gather_optimizer_state, shard_expert_state_dict,
                    shard_optimizer_state)
from .strategy import ExpertParallelDDPStrategy

__all__ = ["ExpertParallelFSDPStrategy", "find_shard_modules"]

STEP_METHODS = ("training_step", "validation_step", "test_step", "predict_step")
SUPPORTED_PRECISIONS = ("32-true", "bf16-mixed")


def find_shard_modules(model: nn.Module, select: str | Sequence[str] | Callable[[nn.Module], bool] | None = None
                       ) -> list[nn.Module]:
    """The submodules of ``model`` that get their own ``fully_shard``, children before parents.

    select: None: every module held by an ``nn.Sequential`` / ``nn.ModuleList`` named ``blocks`` (timm ViT
    blocks); a class name or list of class names (e.g. ``"Block"``); or a predicate on modules.
    """
    if select is None:
        chosen = {id(m) for name, seq in model.named_modules() if name.rsplit(".", 1)[-1] == "blocks"
                  and isinstance(seq, (nn.Sequential, nn.ModuleList)) for m in seq}
        pick = lambda m: id(m) in chosen  # noqa: E731
    elif callable(select):
        pick = select
    else:
        names = {select} if isinstance(select, str) else set(select)
        pick = lambda m: type(m).__name__ in names  # noqa: E731
    # named_modules is pre-order: reversed, a child always comes before its parent (fully_shard bottom-up).
    return [m for name, m in reversed(list(model.named_modules())) if name and pick(m)]


def _full(t: Any) -> Any:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _like(full: Any, ref: Tensor) -> Any:
    """``full`` (a plain tensor shaped like the DTensor ``ref``) as this rank's shard of ``ref``'s layout."""
    if not isinstance(ref, DTensor) or not torch.is_tensor(full) or isinstance(full, DTensor) \
            or full.shape != ref.shape:
        return full
    # Every rank holds the same full tensor (one checkpoint): slice locally, no communication.
    return distribute_tensor(full.to(ref.device), ref.device_mesh, ref.placements, src_data_rank=None)


class ExpertParallelFSDPStrategy(ExpertParallelDDPStrategy):
    """FSDP2 for the dense parameters over all W ranks; the experts sharded over groups of
    ``expert_parallel_size`` ranks (None: all ranks) and reached with all-to-all.

    shard_modules: which submodules get their own ``fully_shard`` (see ``find_shard_modules``; default the
    ``blocks`` of a timm ViT); the LightningModule itself is always the root FSDP module.
    reshard_after_forward: FSDP2's option for the submodules (None: FSDP2's default).

    The LightningModule's ``training_step`` / ``validation_step`` / ``test_step`` / ``predict_step`` are
    registered as FSDP forward methods, so the root's parameters are gathered whatever the step calls.
    precision: ``"32-true"`` or ``"bf16-mixed"`` (Lightning's autocast plugin: float32 parameters, gradients
    and optimizer state, the forward under ``torch.autocast``, router logits still float32; no FSDP2
    ``MixedPrecisionPolicy`` is set up). Anything else raises ValueError at setup: ``"16-mixed"`` would need
    a gradient scaler aware of the sharded gradients; ``"bf16-true"``/``"16-true"``/``"64-true"`` are not
    supported. Other keyword arguments go to Lightning's DDPStrategy (process_group_backend, timeout, ...);
    DDP-only options have no effect.
    """

    strategy_name = "fsdp_expert_parallel"

    def __init__(self, expert_parallel_size: int | None = None, *,
                 shard_modules: str | Sequence[str] | Callable[[nn.Module], bool] | None = None,
                 reshard_after_forward: bool | None = None, **kwargs: Any) -> None:
        super().__init__(expert_parallel_size, **kwargs)
        self.shard_modules = shard_modules
        self.reshard_after_forward = reshard_after_forward

    # --- setup: the same order as DDPStrategy.setup, with fully_shard in place of the DDP wrapper ----------
    def setup(self, trainer: Any) -> None:
        self._check_precision()  # first: no process group, device or model work before a bad precision fails
        assert self.accelerator is not None and self.model is not None
        self.accelerator.setup(trainer)
        # FSDP2 cannot all-gather under torch.inference_mode ("Inference tensors do not track version
        # counter"): evaluate under no_grad, as Lightning does for its own FSDPStrategy. (Fit's validation
        # loop and every loop on gloo already do.)
        for loop in (trainer.validate_loop, trainer.test_loop, trainer.predict_loop):
            loop.inference_mode = False
        fitting = trainer.state.fn == TrainerFn.FITTING
        if fitting and self._layer_sync:
            self.model = self._layer_sync.apply(self.model)
        self.precision_plugin.convert_module(self.model)
        self.model_to_device()  # moves, then shards the experts (rank 0's weights) and installs the clipping
        self._fully_shard()
        if fitting:
            self._reset_optimizers_and_schedulers()  # a second fit/validate must not keep stale params
            self.setup_optimizers(trainer)  # after fully_shard: the optimizer holds the DTensor shards
        self.setup_precision_plugin()
        if fitting:
            _optimizers_to_device(self.optimizers, self.root_device)

    def _check_precision(self) -> None:
        plugin = self.precision_plugin
        precision = str(getattr(plugin, "precision", "32-true"))
        if precision in ("32-true", "32"):
            return
        # bf16-mixed: Lightning's autocast plugin. Parameters, gradients (FSDP2's reduce-scatter, the expert
        # all-reduce) and optimizer state stay float32; only the forward runs under torch.autocast, which
        # FSDP2 needs no MixedPrecisionPolicy for (it all-gathers the float32 shards).
        if precision == "bf16-mixed" and isinstance(plugin, MixedPrecision):
            return
        why = ""
        if precision == "16-mixed":
            # GradScaler checks for inf/nan in the local gradients only: with DTensor shards and experts split
            # over ranks, ranks would disagree on skipping a step (FSDP1 has ShardedGradScaler for that).
            why = (": float16 needs a sharded GradScaler (inf checks agreed over the ranks holding the gradient "
                   "shards and the experts), which this strategy does not set up; use 'bf16-mixed'")
        elif precision == "bf16-mixed":
            why = f" through {type(plugin).__name__}: bf16-mixed needs Lightning's autocast plugin, MixedPrecision"
        raise ValueError(f"{type(self).__name__} does not support precision={precision!r}{why}. "
                         f"Valid: {list(SUPPORTED_PRECISIONS)}")

    def _fully_shard(self) -> None:
        module = self.lightning_module
        if isinstance(module, FSDPModule):
            return  # already sharded by an earlier fit/validate of this strategy
        # Rank 0's dense weights and buffers everywhere (DDP's initial broadcast); experts are ignored here
        # (already taken from rank 0 by shard_experts).
        _sync_module_states(module)
        ignored = {p for p, _ in expert_parameters(module)}
        mesh = init_device_mesh(self.root_device.type, (self.world_size,))
        for sub in find_shard_modules(module, self.shard_modules):
            fully_shard(sub, mesh=mesh, reshard_after_forward=self.reshard_after_forward, ignored_params=ignored)
        fully_shard(module, mesh=mesh, ignored_params=ignored)
        for name in STEP_METHODS:
            if is_overridden(name, module):
                register_fsdp_forward_method(module, name)

    def configure_ddp(self) -> None:  # never wraps: FSDP2 reduces the gradients
        pass

    # --- checkpoints: full plain tensors, experts gathered ----------------------------------------------------
    def lightning_module_state_dict(self) -> dict[str, Any]:
        if self.sharded:
            return self._sharded_module_state()  # dense DTensor shards and expert slices, nothing gathered
        module = self.lightning_module
        state = module.state_dict()
        # full_tensor() is collective over the FSDP mesh: every rank walks the same keys in the same order.
        full = {k: _full(v) for k, v in state.items()}
        return gather_expert_state_dict(module, full)

    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        if self.sharded:
            return self._sharded_optimizer_state(optimizer)
        raw = optimizer._optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
        state = raw.state_dict()
        full = {i: {k: _full(v) for k, v in sorted(entry.items())} for i, entry in sorted(state["state"].items())}
        return gather_optimizer_state(raw, self.lightning_module, {**state, "state": full})

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        if self._restored_sharded:
            return  # load_checkpoint read the weights into the sharded model
        module = self.lightning_module
        state = shard_expert_state_dict(module, checkpoint["state_dict"])
        current = module.state_dict()  # DTensors once fully_shard ran (restores before setup see plain tensors)
        state = {k: _like(v, current[k]) if k in current else v for k, v in state.items()}
        module.load_state_dict(state, strict=strict)

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"]):
            state = shard_optimizer_state(optimizer, self.lightning_module, state)
            params = [p for group in optimizer.param_groups for p in group["params"]]
            if len(params) != sum(len(g["params"]) for g in state["param_groups"]):
                raise ValueError("the checkpoint's optimizer holds another number of parameters than this one")
            local = {i: {k: _like(v, params[i]) for k, v in entry.items()} for i, entry in state["state"].items()}
            optimizer.load_state_dict({**state, "state": local})
            _optimizers_to_device([optimizer], self.root_device)

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(cls.strategy_name, cls,
                                   description="FSDP2 for dense weights with expert parallelism (vmoe)")


if ExpertParallelFSDPStrategy.strategy_name not in StrategyRegistry:
    ExpertParallelFSDPStrategy.register_strategies(StrategyRegistry)
