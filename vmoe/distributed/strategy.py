"""Lightning's DDP strategy with expert parallelism: dense weights data parallel, experts sharded.

Select it from YAML (``trainer.strategy: {class_path: vmoe.distributed.ExpertParallelDDPStrategy,
init_args: {expert_parallel_size: 2}}``), from the CLI (``--trainer.strategy ddp_expert_parallel`` once
vmoe.distributed is imported, or the class path), or in Python.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

from lightning.fabric.utilities.optimizer import _optimizer_to_device
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from .grads import clip_grad_norm_, sync_expert_grads
from .groups import ExpertParallelGroups, new_expert_parallel_groups
from .shard import (expert_parameter_names, gather_expert_state_dict, gather_optimizer_state,
                    shard_expert_state_dict, shard_experts, shard_optimizer_state)
from .shutdown import destroy_process_groups_at_exit

__all__ = ["ExpertParallelDDPStrategy"]


class ExpertParallelDDPStrategy(DDPStrategy):
    """DDP over all W ranks for the dense parameters; the experts of every MoE layer sharded over groups of
    ``expert_parallel_size`` ranks (None: all ranks) and reached with all-to-all.

    - setup: after the model is on its device, every MoE layer keeps its E/P experts (rank 0's weights,
      like DDP's initial broadcast); the expert parameters are excluded from DDP's all-reduce and from
      the state sync of validate/test.
    - every optimizer step: expert gradients are turned into DDP's mean over ranks (``sync_expert_grads``)
      before clipping; norm clipping uses the norm of the whole (sharded) model.
    - checkpoints (``state_dict_type="full"``) hold the full expert set (gathered from the group) and the
      optimizer moments of the full set; loading slices them, so a checkpoint written with P ranks loads
      with any P', 1 included. ``state_dict_type="sharded"``: a ``torch.distributed.checkpoint`` directory
      to which every rank writes only its own expert slices (and the dense weights once), loadable with any
      world size and P' (see vmoe.distributed.dcp; ``dcp_to_checkpoint`` makes one file of it).

    Other keyword arguments are DDPStrategy's (e.g. find_unused_parameters, static_graph, timeout).
    """

    strategy_name = "ddp_expert_parallel"

    def __init__(self, expert_parallel_size: int | None = None, *, state_dict_type: str = "full",
                 start_method: str = "popen", **kwargs: Any) -> None:
        if start_method != "popen":
            raise ValueError(f"ExpertParallelDDPStrategy supports start_method='popen' only, got {start_method!r}: "
                             "the spawn/fork launchers copy rank 0's weights (its expert shard) back into the "
                             "parent's full model")
        if expert_parallel_size is not None and expert_parallel_size < 1:
            raise ValueError(f"expert_parallel_size must be a positive int or None (all ranks), "
                             f"got {expert_parallel_size}")
        if state_dict_type not in ("full", "sharded"):
            raise ValueError(f"state_dict_type must be 'full' (one file, tensors gathered on rank 0) or 'sharded' "
                             f"(a torch.distributed.checkpoint directory, one file per rank), got {state_dict_type!r}")
        super().__init__(start_method=start_method, **kwargs)
        self.expert_parallel_size = expert_parallel_size
        self.state_dict_type = state_dict_type
        self._ep_groups: ExpertParallelGroups | None = None
        self._expert_mesh = None
        self._restored_sharded = False  # the last load_checkpoint read a DCP directory (model + optimizers)

    @property
    def expert_parallel_groups(self) -> ExpertParallelGroups | None:
        return self._ep_groups

    def setup_distributed(self) -> None:
        super().setup_distributed()
        # gloo groups left alive into interpreter shutdown abort the process (see .shutdown)
        destroy_process_groups_at_exit()

    def model_to_device(self) -> None:
        super().model_to_device()
        self._shard_experts()

    def _shard_experts(self) -> None:
        module = self.lightning_module
        if self._ep_groups is None:
            self._ep_groups = new_expert_parallel_groups(self.expert_parallel_size)
        if not shard_experts(module, self._ep_groups):
            rank_zero_warn("ExpertParallelDDPStrategy: the model has no MoE layer; training as plain DDP")
        ignore = set(getattr(module, "_ddp_params_and_buffers_to_ignore", [])) | set(expert_parameter_names(module))
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, sorted(ignore))
        self._use_expert_parallel_clipping()

    def _use_expert_parallel_clipping(self) -> None:
        plugin = self.precision_plugin
        if getattr(plugin, "_vmoe_expert_parallel_clipping", False):
            return

        def clip_grad_by_norm(optimizer: Optimizer, clip_val: float) -> None:
            clip_grad_norm_(plugin.main_params(optimizer), clip_val, self.lightning_module)

        plugin.clip_grad_by_norm = clip_grad_by_norm
        plugin._vmoe_expert_parallel_clipping = True

    def optimizer_step(self, optimizer: Optimizer, closure: Callable[[], Any], model: Any = None,
                       **kwargs: Any) -> Any:
        params = [p for group in optimizer.param_groups for p in group["params"]]

        def closure_then_sync() -> Any:
            # After the step's last backward, before clipping and the update.
            result = closure()
            sync_expert_grads(self.lightning_module, params)
            return result

        return super().optimizer_step(optimizer, closure_then_sync, model, **kwargs)

    # --- checkpoints ------------------------------------------------------------------------------------------
    @property
    def sharded(self) -> bool:
        return self.state_dict_type == "sharded"

    def _mesh(self) -> Any:
        if self._expert_mesh is None:
            if self._ep_groups is None:
                raise RuntimeError("sharded checkpoints need the expert-parallel layout: the strategy is not set up")
            from .dcp import expert_mesh
            self._expert_mesh = expert_mesh(self._ep_groups, self.root_device.type)
        return self._expert_mesh

    def _sharded_module_state(self) -> dict[str, Any]:
        from .dcp import sharded_model_state
        return sharded_model_state(self.lightning_module, self._mesh())

    def _sharded_optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        from .dcp import sharded_optimizer_state
        raw = optimizer._optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
        return sharded_optimizer_state(self.lightning_module, raw, self._mesh())

    def lightning_module_state_dict(self) -> dict[str, Any]:
        if self.sharded:
            return self._sharded_module_state()
        return gather_expert_state_dict(self.lightning_module, super().lightning_module_state_dict())

    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        if self.sharded:
            return self._sharded_optimizer_state(optimizer)
        state = super().optimizer_state(optimizer)
        raw = optimizer._optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
        return gather_optimizer_state(raw, self.lightning_module, state)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        if not self.sharded:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        if storage_options is not None:
            raise TypeError(f"storage_options={storage_options!r}: sharded checkpoints take none")
        from .dcp import save_sharded_checkpoint
        save_sharded_checkpoint(checkpoint, self.broadcast(filepath))  # every rank, one path

    def _ckpt_is_sharded(self) -> bool:
        from .dcp import is_sharded_checkpoint
        trainer = getattr(self._lightning_module, "_trainer", None)
        path = getattr(trainer, "ckpt_path", None)
        return path is not None and is_sharded_checkpoint(path)

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        # A DCP directory is read into the sharded model (its layout must exist first).
        return self.sharded or self._ckpt_is_sharded()

    @property
    def lightning_restore_optimizer(self) -> bool:
        return not self._restored_sharded  # load_checkpoint already put a DCP directory's moments in place

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        from .dcp import is_sharded_checkpoint, load_sharded_checkpoint
        path = self.broadcast(checkpoint_path)
        self._restored_sharded = is_sharded_checkpoint(path)
        if not self._restored_sharded:
            return super().load_checkpoint(checkpoint_path, weights_only)
        if self._ep_groups is None:
            raise RuntimeError(f"{path} is a sharded checkpoint: it loads after the strategy's setup "
                               "(restore_checkpoint_after_setup)")
        module = self.lightning_module
        fitting = module.trainer.state.fn == TrainerFn.FITTING
        optimizers = [o._optimizer if isinstance(o, LightningOptimizer) else o for o in self.optimizers] \
            if fitting else []
        return load_sharded_checkpoint(path, module, optimizers, self._mesh(), strict=module.strict_loading)

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        if self._restored_sharded:
            return  # load_checkpoint read the weights into the sharded model
        state = shard_expert_state_dict(self.lightning_module, checkpoint["state_dict"])
        self.lightning_module.load_state_dict(state, strict=strict)

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"]):
            optimizer.load_state_dict(shard_optimizer_state(optimizer, self.lightning_module, state))
            _optimizer_to_device(optimizer, self.root_device)

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(cls.strategy_name, cls, description="DDP with expert parallelism (vmoe)")


if ExpertParallelDDPStrategy.strategy_name not in StrategyRegistry:
    ExpertParallelDDPStrategy.register_strategies(StrategyRegistry)
