"""ExpertParallelDDPStrategy end to end: 2 CPU ranks (gloo) under Lightning against one process.

Run as a script (``python tests/test_expert_parallel_lightning.py OUT_DIR``), this file trains a tiny MoE
network for 2 steps with 2 ranks, saves a checkpoint, writes each rank's eval logits, then resumes from
the checkpoint on 2 ranks into a differently initialised network for a 3rd step. The test runs the script
and checks, in one process: the weights and SGD momentum after 2 and 3 steps equal a single-process
reference that averages the losses of the two ranks' batches (DDP's semantics, with norm clipping over
the whole model); the 2-rank checkpoint holds the full experts and evaluates with 1 process (plain load
and ``Trainer.validate``) giving each rank's logits.
"""
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from vmoe.moe import MoEMlp

N, T, IN, D, H, C, E = 16, 5, 6, 8, 12, 3, 4
BATCH, CLIP, LR, MOMENTUM = 4, 0.05, 0.5, 0.9


class TinyMoENet(L.LightningModule):
    """embed -> residual MoE (4 experts, k=2, no router noise) -> mean over tokens -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(IN, D)
        self.moe = MoEMlp(D, H, num_experts=E, k=2, capacity_factor=1.0, noise_std=0.0)
        self.head = nn.Linear(D, C)

    def forward(self, x):
        h = self.embed(x)
        return self.head((h + self.moe(h)).mean(1))

    def loss(self, batch):
        x, y = batch
        return F.cross_entropy(self(x), y) + self.moe.aux_loss

    def training_step(self, batch, batch_idx):
        return self.loss(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.loss(batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR, momentum=MOMENTUM)


def dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(123)
    return TensorDataset(torch.randn(N, T, IN, generator=g), torch.randint(0, C, (N,), generator=g))


def rank_batch(rank: int, step: int):
    """What Lightning's DistributedSampler (2 replicas, shuffled with seed 0, epoch set) gives ``rank``."""
    ds = dataset()
    sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=0)
    per_epoch = N // 2 // BATCH
    sampler.set_epoch(step // per_epoch)
    idx = list(sampler)[BATCH * (step % per_epoch):BATCH * (step % per_epoch + 1)]
    return ds.tensors[0][idx], ds.tensors[1][idx]


def trainer(max_steps: int) -> L.Trainer:
    from vmoe.distributed import ExpertParallelDDPStrategy
    return L.Trainer(strategy=ExpertParallelDDPStrategy(), accelerator="cpu", devices=2, max_steps=max_steps,
                     gradient_clip_val=CLIP, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0)


def main(out: Path) -> None:
    torch.set_num_threads(1)
    L.seed_everything(0)
    model = TinyMoENet()
    trainer(2).fit(model, DataLoader(dataset(), batch_size=BATCH))
    fit = model.trainer
    fit.save_checkpoint(out / "ep2.ckpt")
    rank = fit.global_rank
    assert model.moe.experts.fc1_weight.shape[0] == E // 2  # sharded while training
    model.eval()
    with torch.no_grad():
        torch.save(model(rank_batch(rank, 0)[0]), out / f"logits_rank{rank}.pt")
    torch.manual_seed(1)  # other initial weights (the sampler keeps seed 0): all must come from the checkpoint
    resumed = TinyMoENet()
    trainer(3).fit(resumed, DataLoader(dataset(), batch_size=BATCH), ckpt_path=out / "ep2.ckpt")
    resumed.trainer.save_checkpoint(out / "ep3.ckpt")


def reference(steps: int):
    """One process: per step, the mean of the losses of both ranks' batches (each routed on its own)."""
    L.seed_everything(0)
    model = TinyMoENet()
    opt = model.configure_optimizers()
    snapshots = {}
    for step in range(steps):
        opt.zero_grad()
        loss = sum(model.loss(rank_batch(r, step)) for r in (0, 1)) / 2
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        assert norm > CLIP  # clipping is active, so the norm must cover the experts of both ranks
        opt.step()
        snapshots[step + 1] = ({k: v.clone() for k, v in model.state_dict().items()},
                               [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()])
    return snapshots


def assert_matches(ckpt: dict, snapshot) -> None:
    weights, momenta = snapshot
    assert ckpt["state_dict"].keys() == weights.keys()
    for key, value in weights.items():
        torch.testing.assert_close(ckpt["state_dict"][key], value, atol=1e-5, rtol=1e-4, msg=key)
    state = ckpt["optimizer_states"][0]["state"]
    for i, value in enumerate(momenta):
        torch.testing.assert_close(state[i]["momentum_buffer"], value, atol=1e-5, rtol=1e-4, msg=str(i))


def test_expert_parallel_ddp_two_ranks_matches_one_process_and_checkpoint_loads_with_one(tmp_path):
    script = subprocess.run([sys.executable, __file__, str(tmp_path)], capture_output=True, text=True,
                            timeout=600)
    assert script.returncode == 0, script.stdout[-3000:] + script.stderr[-6000:]
    snapshots = reference(3)

    ckpt = torch.load(tmp_path / "ep2.ckpt", weights_only=False)
    assert ckpt["state_dict"]["moe.experts.fc1_weight"].shape == (E, H, D)  # the full expert set
    assert_matches(ckpt, snapshots[2])
    assert_matches(torch.load(tmp_path / "ep3.ckpt", weights_only=False), snapshots[3])  # 2 -> 2 resume

    single = loads_in_one_process(ckpt, tmp_path)
    metrics = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False).validate(
        TinyMoENet(), DataLoader(dataset(), batch_size=N), ckpt_path=tmp_path / "ep2.ckpt", verbose=False)
    with torch.no_grad():
        expected = single.loss(dataset().tensors)
    assert abs(metrics[0]["val_loss"] - float(expected)) < 1e-5



def loads_in_one_process(ckpt: dict, logits_dir: Path) -> TinyMoENet:
    """A plain strict load of a multi-rank checkpoint in 1 process, checked against each rank's logits
    (``logits_rank{r}.pt`` in ``logits_dir``); returns the loaded model, in eval mode."""
    single = TinyMoENet()
    single.load_state_dict(ckpt["state_dict"])
    single.configure_optimizers().load_state_dict(ckpt["optimizer_states"][0])  # full-size moments fit
    single.eval()
    with torch.no_grad():
        for rank in (0, 1):
            torch.testing.assert_close(single(rank_batch(rank, 0)[0]),
                                       torch.load(logits_dir / f"logits_rank{rank}.pt"), atol=1e-5, rtol=1e-5)
    return single

if __name__ == "__main__":
    main(Path(sys.argv[1]))
