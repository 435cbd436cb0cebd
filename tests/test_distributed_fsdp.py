"""ExpertParallelFSDPStrategy end to end: 2 CPU ranks (gloo), dense part sharded by FSDP2, experts by us.

Run as a script (``python tests/test_distributed_fsdp.py OUT_DIR``), this file, on 2 ranks:

1. runs ``main`` of tests/test_expert_parallel_lightning.py with the FSDP strategy in place of the DDP one
   (TinyMoENet: fit 2 steps with norm clipping, checkpoint, each rank's eval logits, resume for a 3rd step
   into other initial weights); ``fully_shard`` goes on every Linear and MoEMlp (nested units, the MoE
   layer's experts ignored) and on the LightningModule;
2. fits a tiny V-MoE ImageClassifier (timm ViT, width 32, depth 2, 8 px digits, MoE in block 1, SGD) for 2
   steps plus validation, with ExpertParallelDDPStrategy and with ExpertParallelFSDPStrategy (default
   units: the ViT's ``blocks``) from the same seed, and writes both checkpoints and the FSDP logits;
3. the same two ViT fits with ``precision="bf16-mixed"`` (autocast), recording per training forward whether
   autocast was on and the dtypes of the router logits and of the MoE layer's output.

Run as ``python tests/test_distributed_fsdp.py OUT_DIR resume CKPT STEPS``, it resumes a checkpoint written by
one process on 2 ranks with the FSDP strategy (the 2 -> 1 -> 2 world-size test).

The tests check in one process: TinyMoENet weights and momenta equal the single-process reference
(the mean of both ranks' losses, clipping over the whole model) after 2 steps and after the resume; the
checkpoints hold full plain tensors and load with a plain ``load_state_dict``, giving each rank's logits;
the ViT trained with FSDP equals the one trained with DDP (weights, momenta, validation loss), in float32
and, to bf16 rounding, in bf16-mixed (weights and momenta stay float32, router logits float32). Unsupported
precisions are rejected at the start of setup, before any distributed work (checked without processes).
"""
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.precision import DoublePrecision, HalfPrecision, MixedPrecision, Precision
from torch.utils.data import DataLoader, TensorDataset

import test_expert_parallel_lightning as ddp_test
from test_expert_parallel_lightning import CLIP, E, assert_matches, loads_in_one_process, reference

VIT = dict(backbone="vit_tiny_patch16_224", num_classes=10, img_size=8, in_chans=1, moe_layers=[1], num_experts=4,
           k=2, noise_std=0.0, optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=0.0, lr_decay="constant",
           model_kwargs=dict(patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0))
VIT_BATCH = 8


def fsdp_trainer(max_steps: int, **strategy_kwargs) -> L.Trainer:
    from vmoe.distributed import ExpertParallelFSDPStrategy
    return L.Trainer(strategy=ExpertParallelFSDPStrategy(**strategy_kwargs), accelerator="cpu", devices=2,
                     max_steps=max_steps, gradient_clip_val=CLIP, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)


def vit_data():
    """32 training and 32 validation digits (8 px, the module's fixed split and normalisation)."""
    from vmoe.train.data import DigitsDataModule
    dm = DigitsDataModule(img_size=8, augment="none")
    dm.setup("fit")
    x, y = next(iter(DataLoader(dm.train_set, batch_size=64)))
    return TensorDataset(x[:32], y[:32]), TensorDataset(x[32:], y[32:])


def record_router_dtypes(model) -> list:
    """Per training-step forward of the MoE layer: (autocast on, router logits dtype, MoE output dtype)."""
    from vmoe.moe.build import iter_moe_mlps
    from vmoe.moe.routers import Router
    calls, logits = [], []

    def router_logits(self, x):
        out = original(self, x)
        logits.append(out.dtype)
        return out

    def hook(layer, args, output):
        if layer.training:
            calls.append((torch.is_autocast_enabled("cpu"), logits[-1], output.dtype))

    original = Router.logits
    Router.logits = router_logits  # every router's logits (restored by the caller)
    (_, layer), = iter_moe_mlps(model)
    layer.register_forward_hook(hook)
    return calls


def fit_vit(strategy, out: Path, name: str, precision: str = "32-true") -> None:
    from vmoe.moe.routers import Router
    from vmoe.train.module import ImageClassifier
    L.seed_everything(0)
    model = ImageClassifier(**VIT)
    train, val = vit_data()
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=2, max_epochs=1, limit_train_batches=2,
                        gradient_clip_val=1e-2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, precision=precision)
    original, router_calls = Router.logits, record_router_dtypes(model)
    try:
        trainer.fit(model, DataLoader(train, batch_size=VIT_BATCH), DataLoader(val, batch_size=VIT_BATCH))
    finally:
        Router.logits = original
    if name.startswith("fsdp"):  # per-block FSDP units; dense weights are DTensor shards, experts plain local tensors
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor

        from vmoe.moe.build import iter_moe_mlps
        assert isinstance(model, FSDPModule) and all(isinstance(b, FSDPModule) for b in model.model.blocks)
        (_, layer), = iter_moe_mlps(model)
        experts = set(layer.experts.parameters())
        assert experts and all(type(p) is torch.nn.Parameter and p.shape[0] == 2 for p in experts)
        opt_params = [p for g in trainer.optimizers[0].param_groups for p in g["params"]]
        assert all(isinstance(p, DTensor) != (p in experts) for p in opt_params)
        assert all(p.dtype == torch.float32 for p in opt_params)  # bf16-mixed too: float32 params (and moments)
    trainer.save_checkpoint(out / f"vit_{name}.ckpt")
    if name == "fsdp":  # loading a full checkpoint into the sharded model: dense parts re-sharded, experts sliced
        trainer.strategy.barrier()
        full = torch.load(out / f"vit_{name}.ckpt", weights_only=False)["state_dict"]
        with torch.no_grad():
            for p in model.parameters():
                (p.to_local() if isinstance(p, DTensor) else p).zero_()
        trainer.strategy.load_model_state_dict({"state_dict": full})
        again = trainer.strategy.lightning_module_state_dict()
        assert again.keys() == full.keys() and all(torch.equal(again[k], full[k]) for k in full)
    model.eval()
    with torch.no_grad():
        logits = model(val.tensors[0][8 * trainer.global_rank:8 * trainer.global_rank + 8])
    torch.save({"logits": logits, "val_loss": trainer.callback_metrics["val/loss"], "router_calls": router_calls},
               out / f"vit_{name}_rank{trainer.global_rank}.pt")


def main(out: Path) -> None:
    from vmoe.distributed import ExpertParallelDDPStrategy, ExpertParallelFSDPStrategy
    ddp_test.trainer = lambda max_steps: fsdp_trainer(max_steps, shard_modules=("Linear", "MoEMlp"))
    ddp_test.main(out)  # TinyMoENet: fit 2 steps, ep2.ckpt, logits, resume into step 3, ep3.ckpt
    fit_vit(ExpertParallelDDPStrategy(), out, "ddp")
    fit_vit(ExpertParallelFSDPStrategy(), out, "fsdp")
    fit_vit(ExpertParallelDDPStrategy(), out, "ddp_bf16", precision="bf16-mixed")
    fit_vit(ExpertParallelFSDPStrategy(), out, "fsdp_bf16", precision="bf16-mixed")


@lru_cache(maxsize=1)
def _run_script(out: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, __file__, out], capture_output=True, text=True, timeout=600)


class RecordBatches(L.Callback):
    """Saves each training batch of each rank (``<prefix>_step{global_step}_rank{rank}.pt``)."""

    def __init__(self, out: Path, prefix: str) -> None:
        self.out, self.prefix = out, prefix

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        torch.save(batch, self.out / f"{self.prefix}_step{trainer.global_step}_rank{trainer.global_rank}.pt")


def resume_on_two_ranks(out: Path, ckpt: Path, max_steps: int) -> None:
    """Second script run: the FSDP strategy on 2 ranks resumes ``ckpt`` (written by 1 process) up to max_steps."""
    from vmoe.distributed import ExpertParallelFSDPStrategy
    torch.set_num_threads(1)
    torch.manual_seed(5)  # other initial weights: all must come from the checkpoint
    model = ddp_test.TinyMoENet()
    trainer = L.Trainer(strategy=ExpertParallelFSDPStrategy(shard_modules=("Linear", "MoEMlp")), accelerator="cpu",
                        devices=2, max_steps=max_steps, gradient_clip_val=CLIP, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, callbacks=[RecordBatches(out, "two")])
    trainer.fit(model, DataLoader(ddp_test.dataset(), batch_size=ddp_test.BATCH), ckpt_path=ckpt)
    assert model.moe.experts.fc1_weight.shape[0] == E // 2  # sliced again on 2 ranks
    trainer.save_checkpoint(out / f"ep{max_steps}_two.ckpt")


def script_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.getbasetemp() / "distributed_fsdp"
    out.mkdir(exist_ok=True)
    run = _run_script(str(out))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    return out


def test_distributed_fsdp_two_ranks_match_one_process_and_resume(tmp_path_factory):
    out = script_dir(tmp_path_factory)
    snapshots = reference(3)
    ckpt = torch.load(out / "ep2.ckpt", weights_only=False)
    assert all(type(v) is torch.Tensor for v in ckpt["state_dict"].values())  # plain tensors, no DTensor
    assert ckpt["state_dict"]["moe.experts.fc1_weight"].shape[0] == E  # the full expert set
    assert_matches(ckpt, snapshots[2])  # weights and momenta, clipping active over the whole model
    assert_matches(torch.load(out / "ep3.ckpt", weights_only=False), snapshots[3])  # 2 -> 2 resume


def test_distributed_fsdp_checkpoint_loads_in_one_process(tmp_path_factory):
    out = script_dir(tmp_path_factory)
    loads_in_one_process(torch.load(out / "ep2.ckpt", weights_only=False), out)


def test_distributed_fsdp_vit_blocks_match_expert_parallel_ddp(tmp_path_factory):
    from vmoe.train.module import ImageClassifier
    out = script_dir(tmp_path_factory)
    ddp = torch.load(out / "vit_ddp.ckpt", weights_only=False)
    fsdp = torch.load(out / "vit_fsdp.ckpt", weights_only=False)
    assert fsdp["state_dict"].keys() == ddp["state_dict"].keys()
    for key, value in ddp["state_dict"].items():
        assert type(fsdp["state_dict"][key]) is torch.Tensor, key
        torch.testing.assert_close(fsdp["state_dict"][key], value, atol=1e-5, rtol=1e-4, msg=key)
    ddp_state, fsdp_state = (c["optimizer_states"][0]["state"] for c in (ddp, fsdp))
    assert fsdp_state.keys() == ddp_state.keys() and ddp_state
    for i, entry in ddp_state.items():
        torch.testing.assert_close(fsdp_state[i]["momentum_buffer"], entry["momentum_buffer"], atol=1e-5, rtol=1e-4)
    # One process, plain model: the FSDP checkpoint gives each rank's logits.
    single = ImageClassifier(**VIT)
    single.load_state_dict(fsdp["state_dict"])
    single.eval()
    _, val = vit_data()
    for rank in (0, 1):
        saved = torch.load(out / f"vit_fsdp_rank{rank}.pt")
        with torch.no_grad():
            torch.testing.assert_close(single(val.tensors[0][8 * rank:8 * rank + 8]), saved["logits"],
                                       atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(saved["val_loss"], torch.load(out / f"vit_ddp_rank{rank}.pt")["val_loss"],
                                   atol=1e-5, rtol=1e-5)


def _change_tolerance(change: torch.Tensor, fraction: float) -> float:
    """``fraction`` of a tensor's largest change over the fit, plus 2 float32 ulps at 1 (norm weights ~1)."""
    return fraction * change.abs().max().item() + 2.4e-7


def test_distributed_fsdp_bf16_mixed_matches_expert_parallel_ddp(tmp_path_factory):
    """bf16-mixed on 2 ranks: FSDP2 + experts vs ExpertParallelDDPStrategy, same seed, 2 SGD steps.

    Both runs do the same bf16 autocast arithmetic on the same data; only the gradient reduction differs
    (FSDP2's reduce-scatter vs DDP's all-reduce: float32 sums in another order). A 1-ulp float32 difference
    after step 1 can flip a bf16 rounding in step 2's forward (relative error up to 2^-8 ~ 4e-3 on that
    element), so the weights must agree to 1% of how far they moved, not to float32 precision (observed:
    ~1e-6 of the change). Against the float32 FSDP run the whole forward is rounded to bf16; 5% of the
    change (observed <= 2.5%, the norm weights, where the change is a few float32 ulps).
    """
    from vmoe.train.module import ImageClassifier
    out = script_dir(tmp_path_factory)
    L.seed_everything(0)
    init = ImageClassifier(**VIT).state_dict()  # fit_vit's initial weights
    ddp, fsdp, fsdp32 = (torch.load(out / f"vit_{n}.ckpt", weights_only=False)
                         for n in ("ddp_bf16", "fsdp_bf16", "fsdp"))
    assert fsdp["state_dict"].keys() == ddp["state_dict"].keys() == init.keys()
    for key, start in init.items():
        value = fsdp["state_dict"][key]
        assert type(value) is torch.Tensor and value.dtype == torch.float32, key  # params stay float32
        change = ddp["state_dict"][key] - start
        assert change.abs().max() > 0, key  # every tensor moved (lr 0.1, clip 1e-2: changes of 5e-6 .. 5e-4)
        torch.testing.assert_close(value, ddp["state_dict"][key], rtol=0, atol=_change_tolerance(change, 1e-2),
                                   msg=key)
        torch.testing.assert_close(value, fsdp32["state_dict"][key], rtol=0,
                                   atol=_change_tolerance(fsdp32["state_dict"][key] - start, 5e-2), msg=key)
    # autocast did change the arithmetic (the router calls below show it was on during the steps)
    assert any(not torch.equal(v, fsdp32["state_dict"][k]) for k, v in fsdp["state_dict"].items())
    ddp_state, fsdp_state = (c["optimizer_states"][0]["state"] for c in (ddp, fsdp))
    assert fsdp_state.keys() == ddp_state.keys() and ddp_state
    for i, entry in ddp_state.items():
        momentum = fsdp_state[i]["momentum_buffer"]
        assert momentum.dtype == torch.float32
        torch.testing.assert_close(momentum, entry["momentum_buffer"], rtol=0,
                                   atol=_change_tolerance(entry["momentum_buffer"], 1e-2))
    for rank in (0, 1):
        saved = torch.load(out / f"vit_fsdp_bf16_rank{rank}.pt")
        # each training forward (2 steps) ran under autocast, the router's logits in float32, the MoE layer's
        # output (experts) in bf16; the 32-true run had no autocast and float32 everywhere
        assert saved["router_calls"] == [(True, torch.float32, torch.bfloat16)] * 2
        fp32_calls = torch.load(out / f"vit_fsdp_rank{rank}.pt")["router_calls"]
        assert fp32_calls == [(False, torch.float32, torch.float32)] * 2
        # validation under bf16 autocast too: loss ~2.3, bf16 resolution there ~1e-2
        torch.testing.assert_close(saved["val_loss"], torch.load(out / f"vit_ddp_bf16_rank{rank}.pt")["val_loss"],
                                   atol=1e-2, rtol=0)


@pytest.mark.parametrize("precision, plugin, match", [
    ("16-mixed", lambda: MixedPrecision("16-mixed", "cpu"), "precision='16-mixed'.*sharded GradScaler"),
    ("bf16-true", lambda: HalfPrecision("bf16-true"), "precision='bf16-true'"),
    ("16-true", lambda: HalfPrecision("16-true"), "precision='16-true'"),
    ("64-true", lambda: DoublePrecision(), "precision='64-true'"),
], ids=["16-mixed", "bf16-true", "16-true", "64-true"])
def test_distributed_fsdp_rejects_unsupported_precision(precision, plugin, match):
    from vmoe.distributed import ExpertParallelFSDPStrategy
    strategy = ExpertParallelFSDPStrategy()
    strategy.precision_plugin = plugin()
    assert strategy.precision_plugin.precision == precision
    # checked first thing in setup: no trainer, accelerator, model or process group needed
    with pytest.raises(ValueError, match=match + r".*Valid: \['32-true', 'bf16-mixed'\]"):
        strategy.setup(None)


def test_distributed_fsdp_accepts_32_true_and_bf16_mixed_plugins():
    from vmoe.distributed import ExpertParallelFSDPStrategy
    strategy = ExpertParallelFSDPStrategy()
    for plugin in (Precision(), MixedPrecision("bf16-mixed", "cpu")):
        strategy.precision_plugin = plugin
        strategy._check_precision()


def _replay_step(model, opt, batches) -> None:
    """One optimizer step of the 2-rank semantics in one process: the mean of the ranks' losses, norm clipping
    over the whole model (each rank's batch routed on its own)."""
    opt.zero_grad()
    (sum(model.loss(b) for b in batches) / len(batches)).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    opt.step()


def _snapshot(model, opt):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()])


def test_distributed_fsdp_resumes_on_another_world_size(tmp_path_factory):
    """2 ranks (FSDP2 + 2 expert shards) -> 1 process -> 2 ranks again, one step each after the first two:
    weights and momenta equal a one-process replay of the same batches at every stage (1e-5)."""
    out = script_dir(tmp_path_factory)
    # 2 -> 1: a plain single-process Trainer resumes the 2-rank checkpoint (full experts, full moments).
    torch.manual_seed(3)
    one = ddp_test.TinyMoENet()
    batches = []
    record = L.Callback()
    record.on_train_batch_start = lambda trainer, module, batch, idx: batches.append(batch)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=3, gradient_clip_val=CLIP, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, callbacks=[record])
    trainer.fit(one, DataLoader(ddp_test.dataset(), batch_size=ddp_test.BATCH), ckpt_path=out / "ep2.ckpt")
    assert trainer.global_step == 3 and len(batches) == 1
    trainer.save_checkpoint(out / "ep3_one.ckpt")
    # 1 -> 2: the FSDP strategy on 2 ranks resumes the single-process checkpoint.
    run = subprocess.run([sys.executable, __file__, str(out), "resume", str(out / "ep3_one.ckpt"), "4"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]

    ref = ddp_test.TinyMoENet()
    ep2 = torch.load(out / "ep2.ckpt", weights_only=False)
    ref.load_state_dict(ep2["state_dict"])
    opt = ref.configure_optimizers()
    opt.load_state_dict(ep2["optimizer_states"][0])
    _replay_step(ref, opt, batches)  # step 3, one process, one batch
    assert_matches(torch.load(out / "ep3_one.ckpt", weights_only=False), _snapshot(ref, opt))
    two = [torch.load(out / f"two_step3_rank{r}.pt") for r in (0, 1)]
    assert not torch.equal(two[0][0], two[1][0])  # each rank had its own batch
    _replay_step(ref, opt, two)  # step 4, two ranks
    assert_matches(torch.load(out / "ep4_two.ckpt", weights_only=False), _snapshot(ref, opt))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[2] == "resume":
        resume_on_two_ranks(Path(sys.argv[1]), Path(sys.argv[3]), int(sys.argv[4]))
    else:
        main(Path(sys.argv[1]))
