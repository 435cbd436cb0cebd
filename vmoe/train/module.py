"""ImageClassifier: the LightningModule that trains and evaluates a V-MoE (or a dense timm ViT)."""
from __future__ import annotations

from functools import partial
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from lightning.pytorch.utilities import rank_zero_warn
from torchmetrics.classification import MulticlassAccuracy

from ..models import aux_loss, block_index
from ..models.build import build_network
from ..models.ensemble import ensemble_log_probs
from ..moe import MoEConfig, iter_moe_mlps
from ..moe.routers import after_optimizer_step
from .mixup import build_mixup, mix_batch, soft_target_cross_entropy, warn_if_normalisation_differs
from .schedule import warmup_decay_factor

__all__ = ["ImageClassifier"]

def _block_name(qualified: str) -> str:
    """"blocks.3.mlp" -> "block3" (the metric key of a MoE layer); other layouts keep their dotted path."""
    index = block_index(qualified)
    return qualified.replace(".", "_") if index is None else f"block{index}"


class ImageClassifier(L.LightningModule):
    """Image classification with a V-MoE or a dense timm ViT.

    The network is ``self.model`` (state-dict prefix "model.").
    ``moe_layers=None`` makes it dense (the MoE arguments are then unused, and eval_capacity_factor /
    batch_priority must stay at their defaults). Loss: cross-entropy on logits [B, C] + the MoE auxiliary
    loss; with Mixup/CutMix (timm's ``Mixup``) the targets become soft and train/acc1 counts the class with the
    largest share of the mixed target. No weight decay on biases, norms, position embeddings and tokens. Logs
    {train,val,test}/{loss,acc1,acc5,aux_loss} and {stage}/moe/block{i}/{load_cv,dropped_fraction}.
    ``compile=True`` compiles the network in ``configure_model`` (parameter names and checkpoints unchanged;
    MoE layers take the static-capacity dispatch).

    Routing: k, capacity_factor, eval_capacity_factor (None = the training factor), batch_priority,
    noise_std, group_size (None = the whole local batch) and bfloat16_dispatch become the
    :class:`vmoe.moe.RoutingSettings` every MoE layer is built with. ``vmoe validate/test/predict
    --ckpt_path`` take eval_capacity_factor and batch_priority from the command (so a trained checkpoint is
    re-evaluated at another capacity without retraining); a resumed ``vmoe fit --ckpt_path`` keeps the
    checkpoint's routing and refuses a flag that would change it.

    Loss: cross-entropy on logits [B, C] (``label_smoothing`` in training only) + the MoE auxiliary loss.
    E³ models: in training every member's cross-entropy (mean over members); in val/test the loss and the
    accuracies are those of the ensemble, log(mean over members of softmax), as the reference evaluates.
    Logs {train,val,test}/{loss,acc1,acc5,aux_loss} and {stage}/moe/block{i}/{load_cv,dropped_fraction}.

    Args:
        backbone: timm ViT name, e.g. vit_small_patch16_224; model_kwargs resize it.
        num_classes: Number of classes C (linked from the data module).
        img_size: Input image side in pixels (linked from the data module).
        in_chans: Input channels (linked from the data module).
        model_kwargs: Arguments for timm's model, e.g. {embed_dim: 64, depth: 4, num_heads: 4, patch_size: 4}.
        moe_layers: Blocks made MoE: "every-2", "last-2", a list of block indices, or null for a dense ViT.
        num_experts: Experts E per MoE block, or one E per MoE block (pyramid).
        k: Experts per token K; null = the router's default (vmoe: 2, switch: 1).
        capacity_factor: Slots per expert relative to a uniform load in training; null = the router's default.
        eval_capacity_factor: Capacity factor in validate/test/predict; null = the training factor.
        batch_priority: Batch Priority Routing: the tokens with the largest gate are served first.
        noise_std: Router noise scale (vmoe: sigma = noise_std / E); null = the router's default.
        group_size: Tokens per routing group; null = the whole local batch.
        bfloat16_dispatch: Round the expert inputs and outputs to bfloat16 (the combine stays float32).
        router: Routing scheme, one of deepseek, deepseek_v3, dense, ensemble, expert_choice, gshard, mixtral,
            shazeer, soft, switch, vmoe (vmoe.moe.available_routers()).
        moe_kwargs: Further MoE block arguments: router_kwargs, expert_granularity, num_shared_experts, residual, ...
        pretrained: Start from timm's pretrained weights of the backbone (downloads them).
        checkpoint_path: Starting weights: a .ckpt of this module or .safetensors/.pth of the network (dense
            weights are upcycled into the V-MoE).
        upcycle_kwargs: Arguments of upcycling dense weights into experts: expert_noise, router_init_std.
        optimizer: Optimiser: adamw, adam or sgd (Nesterov).
        lr: Peak learning rate, reached after warmup_steps.
        weight_decay: Decoupled weight decay (none on biases, norms, position embeddings and tokens).
        betas: Adam/AdamW betas.
        momentum: SGD momentum.
        warmup_steps: Optimizer steps of linear warmup from 0 to lr.
        lr_decay: Schedule after warmup: cosine, linear or constant.
        min_lr_ratio: Final learning rate as a fraction of lr.
        label_smoothing: Label smoothing of the training cross-entropy (0 <= value < 1).
        mixup_alpha: Mixup beta-distribution alpha; > 0 switches Mixup on.
        cutmix_alpha: CutMix beta-distribution alpha; > 0 switches CutMix on.
        cutmix_minmax: CutMix box size range as fractions of the image (overrides cutmix_alpha); null = off.
        mixup_prob: Probability of mixing a training batch.
        mixup_switch_prob: Probability of CutMix instead of Mixup when both are on.
        mixup_mode: Mixing granularity: batch, pair or elem.
        compile: Compile the network with torch.compile (nn.Module.compile) before training.
        compile_kwargs: Arguments of torch.compile, e.g. {mode: max-autotune}; needs compile=true.
    """

    def __init__(
        self,
        backbone: str = "vit_small_patch16_224",
        num_classes: int = 1000,
        img_size: int = 224,
        in_chans: int = 3,
        model_kwargs: dict[str, Any] | None = None,
        moe_layers: str | list[int] | None = "every-2",
        num_experts: int | list[int] = 8,
        k: int | None = None,
        capacity_factor: float | None = None,
        eval_capacity_factor: float | None = None,
        batch_priority: bool = False,
        noise_std: float | None = None,
        group_size: int | None = None,
        bfloat16_dispatch: bool = False,
        router: str = "vmoe",
        moe_kwargs: dict[str, Any] | None = None,
        pretrained: bool = False,
        checkpoint_path: str | None = None,
        upcycle_kwargs: dict[str, Any] | None = None,
        optimizer: Literal["adamw", "adam", "sgd"] = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        momentum: float = 0.9,
        warmup_steps: int = 0,
        lr_decay: Literal["cosine", "linear", "constant"] = "cosine",
        min_lr_ratio: float = 0.0,
        label_smoothing: float = 0.0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        cutmix_minmax: tuple[float, float] | None = None,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
        mixup_mode: Literal["batch", "pair", "elem"] = "batch",
        compile: bool = False,
        compile_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if optimizer not in ("adamw", "adam", "sgd"):
            raise ValueError(f"optimizer must be 'adamw', 'adam' or 'sgd', got {optimizer!r}")
        if lr <= 0 or weight_decay < 0 or warmup_steps < 0 or not 0 <= label_smoothing < 1:
            raise ValueError(f"need lr > 0, weight_decay >= 0, warmup_steps >= 0, 0 <= label_smoothing < 1; got "
                             f"lr={lr}, weight_decay={weight_decay}, warmup_steps={warmup_steps}, "
                             f"label_smoothing={label_smoothing}")
        if lr_decay not in ("cosine", "linear", "constant"):
            raise ValueError(f"lr_decay must be 'cosine', 'linear' or 'constant', got {lr_decay!r}")
        if moe_layers is None:
            moe_only = dict(eval_capacity_factor=eval_capacity_factor, batch_priority=batch_priority,
                            bfloat16_dispatch=bfloat16_dispatch, upcycle_kwargs=upcycle_kwargs)
            moe_only = {name: value for name, value in moe_only.items() if value not in (None, False, {})}
            if moe_only:
                raise ValueError(f"{sorted(moe_only)} act on MoE layers, but moe_layers=None builds a dense model "
                                 f"(got {moe_only})")
        if compile_kwargs and not compile:
            raise ValueError(f"compile_kwargs={compile_kwargs} needs compile=True")
        # The MoE settings are checked here, once, and travel down as this one object.
        moe = None if moe_layers is None else MoEConfig.from_flat(**{name: self.hparams[name]
                                                                      for name in MoEConfig.field_names()})
        self.model = build_network(backbone, num_classes=num_classes, img_size=img_size, in_chans=in_chans, moe=moe,
                                   pretrained=pretrained, checkpoint_path=checkpoint_path, model_kwargs=model_kwargs,
                                   upcycle_kwargs=upcycle_kwargs)
        self.moe_layer_names = {name: _block_name(name) for name, _ in iter_moe_mlps(self.model)}
        if moe_layers is not None and not self.moe_layer_names:
            raise ValueError(f"moe_layers={moe_layers!r} placed no MoE layer in {backbone}")
        accuracy = {}
        for stage in ("train", "val", "test"):
            accuracy[f"{stage}_acc1"] = MulticlassAccuracy(num_classes, top_k=1, average="micro")
            if num_classes >= 5:
                accuracy[f"{stage}_acc5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
        self.accuracy = nn.ModuleDict(accuracy)
        self.mixup = build_mixup(num_classes, label_smoothing=label_smoothing, mixup_alpha=mixup_alpha,
                                 cutmix_alpha=cutmix_alpha, cutmix_minmax=cutmix_minmax, prob=mixup_prob,
                                 switch_prob=mixup_switch_prob, mode=mixup_mode)

    def configure_model(self) -> None:
        if self.hparams.get("compile") and not getattr(self, "_compiled", False):
            self.model.compile(**(self.hparams.get("compile_kwargs") or {}))
            self._compiled = True

    def forward(self, x: Tensor) -> Tensor:
        """x [B, in_chans, img_size, img_size] -> logits [B, num_classes]."""
        return self.model(x)

    def aux_loss(self) -> Tensor:
        """Sum of the weighted auxiliary losses of the MoE layers from the latest forward (0 when dense)."""
        return torch.as_tensor(aux_loss(self.model), dtype=torch.float32, device=self.device)

    def _shared_step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        x, y = batch
        smoothing = self.hparams.label_smoothing if stage == "train" else 0.0
        soft = None
        if stage == "train" and self.mixup is not None:
            # soft targets [B, num_classes] (label smoothing included); accuracy counts the largest share
            x, soft = mix_batch(self.mixup, x, y)
        members = getattr(self.model, "forward_members", None)
        if members is not None:  # E³: every member learns the label; metrics and eval loss score the ensemble
            member_logits = members(x).float()  # [B, M, N]
            logits = ensemble_log_probs(member_logits)  # log(mean softmax), [B, N], as the reference evaluates
            m = member_logits.shape[1]
            if soft is not None:
                task = soft_target_cross_entropy(member_logits.flatten(0, 1), soft.repeat_interleave(m, dim=0))
            elif stage == "train":
                task = F.cross_entropy(member_logits.flatten(0, 1), y.repeat_interleave(m, dim=0),
                                       label_smoothing=smoothing)
            else:  # the reference's ensemble_softmax_xent_eval: cross-entropy of the ensemble's probabilities
                task = F.nll_loss(logits, y)
        elif soft is not None:
            logits = self(x).float()
            task = soft_target_cross_entropy(logits, soft)
        else:
            logits = self(x).float()
            task = F.cross_entropy(logits, y, label_smoothing=smoothing)
        aux = self.aux_loss()
        loss = task + aux
        train = stage == "train"
        # Epoch means of plain tensors are averaged over processes too (torchmetrics objects sync themselves).
        log = partial(self.log, on_step=train, on_epoch=not train, batch_size=x.shape[0], sync_dist=not train)
        log(f"{stage}/loss", loss, prog_bar=True)
        log(f"{stage}/aux_loss", aux)
        for top in ("acc1", "acc5"):
            if f"{stage}_{top}" in self.accuracy:  # acc5 only exists with >= 5 classes
                metric = self.accuracy[f"{stage}_{top}"]
                metric(logits.detach(), y)
                log(f"{stage}/{top}", metric, prog_bar=top == "acc1", sync_dist=False)
        for name, layer in iter_moe_mlps(self.model):
            key = self.moe_layer_names.get(name, _block_name(name))
            for metric_name in ("load_cv", "dropped_fraction"):
                if metric_name in layer.metrics:  # a scheme that drops nothing may not report drops
                    log(f"{stage}/moe/{key}/{metric_name}", layer.metrics[metric_name].float())
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        """Returns probs [B, C], pred [B] and, when the batch has labels, target [B]."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        probs = self(x).float().softmax(-1)
        out = {"probs": probs, "pred": probs.argmax(-1)}
        if isinstance(batch, (tuple, list)) and len(batch) > 1:
            out["target"] = batch[1]
        return out

    def on_fit_start(self) -> None:
        warn_if_normalisation_differs(self)

    # --- optimisation ---------------------------------------------------------------------------------------
    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # Once per real optimizer step (not per micro-batch): e.g. DeepSeek-V3's bias update.
        after_optimizer_step(self.model)

    def _param_groups(self) -> list[dict[str, Any]]:
        skip = set(getattr(self.model, "no_weight_decay", lambda: set())())
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            # Stacked expert biases are 2-D ([E, H]), so go by name as well as by rank.
            if param.ndim <= 1 or name.endswith("bias") or name in skip or name.split(".")[-1] in skip:
                no_decay.append(param)
            else:
                decay.append(param)
        return [{"params": decay, "weight_decay": self.hparams.weight_decay},
                {"params": no_decay, "weight_decay": 0.0}]

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        groups = self._param_groups()
        if hp.optimizer == "sgd":
            opt = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum, nesterov=hp.momentum > 0)
        else:
            cls = torch.optim.AdamW if hp.optimizer == "adamw" else torch.optim.Adam
            opt = cls(groups, lr=hp.lr, betas=tuple(hp.betas))
        total = self.trainer.estimated_stepping_batches
        if total == float("inf"):
            raise ValueError("the learning-rate schedule needs a finite run: set trainer.max_steps or max_epochs")
        total = max(1, int(total))
        warmup = hp.warmup_steps
        if warmup > total:  # e.g. fast_dev_run or a max_steps override on a long config
            rank_zero_warn(f"warmup_steps={warmup} exceeds the run's {total} optimizer steps; warming up over "
                           f"all {total} steps instead")
            warmup = total
        factor = partial(warmup_decay_factor, warmup_steps=warmup, total_steps=total, decay=hp.lr_decay,
                         min_lr_ratio=hp.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}
