"""Sharded (DCP) checkpoints and a multi-node world: 2 ranks -> 2 nodes x 2 ranks -> 1 process, against a replay.

Run as a script, this file is one stage of the chain (TinyMoENet of tests/test_expert_parallel_lightning.py
with AdamW, norm clipping, gloo on CPU, ``state_dict_type="sharded"``):

- ``python tests/test_distributed_checkpoint.py two OUT``: 2 ranks (Lightning's launcher) fit 2 steps from seed
  0 with ExpertParallelDDPStrategy (P=2) and save the DCP directory OUT/ep2;
- ``NODE_RANK=n MASTER_ADDR=... MASTER_PORT=... WORLD_SIZE=4 python tests/test_distributed_checkpoint.py nodes
  OUT CKPT STEPS STRATEGY P NAME``: one "node" of a 2-node x 2-process world (``num_nodes=2, devices=2``, as
  on a cluster without a scheduler; Lightning starts the node's 2 local ranks), resuming CKPT into other
  initial weights and saving OUT/NAME. Experts over P=4 ranks = groups across the nodes; P=2 = a group per node.

The test runs 2 -> 4 (DDP, P=4, across nodes) -> 4 (FSDP2, P=2, inside each node, 2 replicas) -> 1 (the
converted file, a plain Trainer) and checks at every stage that the weights and every optimizer state tensor
equal a one-process replay of the same batches (the mean of the ranks' losses, clipping over the whole model)
to 1e-5, and that each rank wrote only its own expert slices.
"""
import os
import signal
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

import test_expert_parallel_lightning as ddp_test
from test_distributed_fsdp import RecordBatches, _replay_step

STAGE_TIMEOUT_S = 300  # per launched world; collectives time out sooner (DIST_TIMEOUT) if a rank dies
DIST_TIMEOUT = timedelta(seconds=120)


class AdamNet(ddp_test.TinyMoENet):
    """TinyMoENet with AdamW: two moments and a step count per parameter to carry through the checkpoints."""

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.02, weight_decay=0.01)


def strategy(name: str, ep_size: int | None):
    from vmoe.distributed import ExpertParallelDDPStrategy, ExpertParallelFSDPStrategy
    if name == "ddp":
        return ExpertParallelDDPStrategy(ep_size, state_dict_type="sharded", timeout=DIST_TIMEOUT)
    return ExpertParallelFSDPStrategy(ep_size, state_dict_type="sharded", shard_modules=("Linear", "MoEMlp"),
                                      timeout=DIST_TIMEOUT)


def fit(out: Path, name: str, max_steps: int, strategy_name: str, ep_size: int | None, ckpt: Path | None = None,
        num_nodes: int = 1) -> None:
    torch.set_num_threads(1)
    L.seed_everything(0 if ckpt is None else 7)  # resumed: other initial weights, all must come from ckpt
    model = AdamNet()
    trainer = L.Trainer(strategy=strategy(strategy_name, ep_size), accelerator="cpu", devices=2, num_nodes=num_nodes,
                        max_steps=max_steps, gradient_clip_val=ddp_test.CLIP, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[RecordBatches(out, name)])
    trainer.fit(model, DataLoader(ddp_test.dataset(), batch_size=ddp_test.BATCH), ckpt_path=ckpt)
    assert model.moe.experts.fc1_weight.shape[0] == ddp_test.E // (ep_size or trainer.world_size)
    trainer.save_checkpoint(out / name)


# --- launching worlds ------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(commands: list[list[str]], envs: list[dict]) -> None:
    """Start one process per command (each its own process group, with the ranks it launches) and wait; on a
    failure or timeout every group is killed and the output of each is reported."""
    procs = [subprocess.Popen(cmd, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True) for cmd, env in zip(commands, envs)]
    outputs, failed = [], False
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=STAGE_TIMEOUT_S)
            outputs.append(out)
            failed |= proc.returncode != 0
    except subprocess.TimeoutExpired:
        failed = True
    finally:
        for proc in procs:
            if proc.poll() is None or failed:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
    assert not failed, "\n----\n".join(o[-4000:] for o in outputs) or "timed out"


def run_nodes(out: Path, ckpt: Path, steps: int, strategy_name: str, ep_size: int, name: str) -> None:
    port = str(_free_port())
    cmd = [sys.executable, __file__, "nodes", str(out), str(ckpt), str(steps), strategy_name, str(ep_size), name]
    envs = [dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NODE_RANK=str(node), WORLD_SIZE="4", OMP_NUM_THREADS="1")
            for node in (0, 1)]
    run_world([cmd, cmd], envs)


# --- the one-process replay --------------------------------------------------------------------------------
def batches(out: Path, name: str, step: int, world: int) -> list:
    return [torch.load(out / f"{name}_step{step}_rank{r}.pt") for r in range(world)]


def assert_equal_to_replay(ckpt: dict, model, opt, label: str, tol: float = 1e-5) -> float:
    """Weights and every optimizer state tensor of a one-file checkpoint vs the replay; returns the largest
    absolute difference."""
    worst = 0.0
    weights = model.state_dict()
    assert ckpt["state_dict"].keys() == weights.keys(), label
    for key, value in weights.items():
        got = ckpt["state_dict"][key]
        assert type(got) is torch.Tensor and got.shape == value.shape, (label, key)
        worst = max(worst, (got - value).abs().max().item())
    expected = opt.state_dict()["state"]
    state = ckpt["optimizer_states"][0]["state"]
    assert state.keys() == expected.keys() and len(expected) == len(weights), label
    for i, entry in expected.items():
        assert state[i].keys() == entry.keys(), (label, i)
        for k, v in entry.items():
            worst = max(worst, (state[i][k].float() - v.float()).abs().max().item())
    assert worst <= tol, f"{label}: largest difference {worst:.3g} > {tol}"
    print(f"{label}: largest |difference| to the one-process replay = {worst:.3g}")
    return worst


def assert_each_rank_wrote_its_own_experts(path: Path, ep_size: int, num_replicas: int) -> None:
    """Every slice of the expert axis is stored once, in the file of a rank that holds it."""
    import torch.distributed.checkpoint as dcp

    meta = dcp.FileSystemReader(path).read_metadata()
    key = "state_dict.moe.experts.fc1_weight"
    chunks = meta.state_dict_metadata[key].chunks
    assert sorted(c.offsets[0] for c in chunks) == [i * ddp_test.E // ep_size for i in range(ep_size)]
    assert all(c.sizes[0] == ddp_test.E // ep_size for c in chunks)
    for index, info in meta.storage_data.items():
        if index.fqn == key:
            rank = int(info.relative_path.split("_")[2])  # __<rank>_<n>.distcp
            slot = index.offset[0] // (ddp_test.E // ep_size)
            assert rank % ep_size == slot and rank < ep_size * num_replicas, (info.relative_path, index.offset)
    assert len({i.relative_path for i in meta.storage_data.values()}) == ep_size * num_replicas  # a file per rank


def test_sharded_checkpoint_two_ranks_to_two_nodes_to_one_process(tmp_path):
    from vmoe.distributed import dcp_to_checkpoint, is_sharded_checkpoint

    out = tmp_path
    run_world([[sys.executable, __file__, "two", str(out)]], [dict(OMP_NUM_THREADS="1")])
    assert is_sharded_checkpoint(out / "ep2") and not (out / "ep2").is_file()
    assert_each_rank_wrote_its_own_experts(out / "ep2", ep_size=2, num_replicas=1)

    L.seed_everything(0)
    ref = AdamNet()
    opt = ref.configure_optimizers()
    for step in (0, 1):
        _replay_step(ref, opt, batches(out, "ep2", step, 2))
    one = torch.load(dcp_to_checkpoint(out / "ep2", out / "ep2.ckpt"), weights_only=False)
    assert one["global_step"] == 2 and one["state_dict"]["moe.experts.fc1_weight"].shape[0] == ddp_test.E
    assert_equal_to_replay(one, ref, opt, "2 ranks (DDP, P=2), step 2")

    # 2 nodes x 2 ranks, experts over all 4 ranks (groups across the nodes), from the 2-rank DCP checkpoint
    run_nodes(out, out / "ep2", 3, "ddp", 4, "ep3")
    assert_each_rank_wrote_its_own_experts(out / "ep3", ep_size=4, num_replicas=1)
    _replay_step(ref, opt, batches(out, "ep3", 2, 4))
    assert_equal_to_replay(torch.load(dcp_to_checkpoint(out / "ep3", out / "ep3.ckpt"), weights_only=False), ref, opt,
                           "2 nodes x 2 ranks (DDP, P=4 across nodes), step 3")

    # 2 nodes x 2 ranks, FSDP2 dense shards, experts over the 2 ranks of each node (2 replicas)
    run_nodes(out, out / "ep3", 4, "fsdp", 2, "ep4")
    assert_each_rank_wrote_its_own_experts(out / "ep4", ep_size=2, num_replicas=2)
    _replay_step(ref, opt, batches(out, "ep4", 3, 4))
    assert_equal_to_replay(torch.load(dcp_to_checkpoint(out / "ep4", out / "ep4.ckpt"), weights_only=False), ref, opt,
                           "2 nodes x 2 ranks (FSDP2, P=2 per node), step 4")

    # 1 process: a plain Trainer resumes the converted file for a 5th step
    torch.manual_seed(11)
    single, seen = AdamNet(), []
    record = L.Callback()
    record.on_train_batch_start = lambda trainer, module, batch, idx: seen.append(batch)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=5, gradient_clip_val=ddp_test.CLIP, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, callbacks=[record])
    trainer.fit(single, DataLoader(ddp_test.dataset(), batch_size=ddp_test.BATCH), ckpt_path=out / "ep4.ckpt")
    assert trainer.global_step == 5 and len(seen) == 1
    trainer.save_checkpoint(out / "ep5.ckpt")
    _replay_step(ref, opt, seen)
    assert_equal_to_replay(torch.load(out / "ep5.ckpt", weights_only=False), ref, opt, "1 process, step 5")


def test_sharded_checkpoint_options_are_checked(tmp_path):
    from vmoe.distributed import ExpertParallelDDPStrategy, dcp_to_checkpoint
    with pytest.raises(ValueError, match="state_dict_type must be 'full'.*'sharded'.*got 'dcp'"):
        ExpertParallelDDPStrategy(state_dict_type="dcp")
    (tmp_path / "plain").mkdir()
    with pytest.raises(FileNotFoundError, match="not a sharded checkpoint directory"):
        dcp_to_checkpoint(tmp_path / "plain", tmp_path / "x.ckpt")
    assert not (tmp_path / "x.ckpt").exists()
    from vmoe.distributed.dcp import save_sharded_checkpoint
    with pytest.raises(ValueError, match="do not support EMAWeightAveraging"):
        save_sharded_checkpoint({"state_dict": {}, "current_model_state": {}}, tmp_path / "ema")
    assert not (tmp_path / "ema").exists()
    from vmoe.train.from_checkpoint import read_lightning_checkpoint
    with pytest.raises(ValueError, match="--ckpt_path .*plain is a directory but not a sharded checkpoint"):
        read_lightning_checkpoint(tmp_path / "plain")


def test_sharded_checkpoint_in_one_process_before_and_after_the_first_step(tmp_path):
    """No process group, no sharded experts (DCP runs without one): an AdamW that has not stepped is saved
    with its param groups only and stays unstepped after a load (no zero-lr step counted); after a step the
    moments and the step count round-trip exactly, through a load and through the one-file converter."""
    from vmoe.distributed.dcp import (dcp_to_checkpoint, load_sharded_checkpoint, save_sharded_checkpoint,
                                      sharded_model_state, sharded_optimizer_state)

    def save(model, opt, name):
        save_sharded_checkpoint({"state_dict": sharded_model_state(model, None), "epoch": 3,
                                 "optimizer_states": [sharded_optimizer_state(model, opt, None)]}, tmp_path / name)

    torch.manual_seed(0)
    model = AdamNet()
    opt = model.configure_optimizers()
    save(model, opt, "fresh")
    assert not opt.state  # saving did not initialise the moments
    other = AdamNet()
    other_opt = other.configure_optimizers()
    meta = load_sharded_checkpoint(tmp_path / "fresh", other, [other_opt], None)
    assert meta == {"epoch": 3} and not other_opt.state
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    assert dcp_to_checkpoint(tmp_path / "fresh", tmp_path / "fresh.ckpt") and \
        torch.load(tmp_path / "fresh.ckpt", weights_only=False)["optimizer_states"][0]["state"] == {}

    _replay_step(model, opt, [ddp_test.dataset().tensors])
    save(model, opt, "stepped")  # replaces nothing: a new directory
    save(model, opt, "stepped")  # over an existing checkpoint
    fresh = AdamNet()
    fresh_opt = fresh.configure_optimizers()
    load_sharded_checkpoint(tmp_path / "stepped", fresh, [fresh_opt], None)
    assert_equal_to_replay({"state_dict": fresh.state_dict(), "optimizer_states": [fresh_opt.state_dict()]}, model,
                           opt, "one process, loaded", tol=0.0)
    one = torch.load(dcp_to_checkpoint(tmp_path / "stepped", tmp_path / "stepped.ckpt"), weights_only=False)
    assert_equal_to_replay(one, model, opt, "one process, converted", tol=0.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "fresh.ckpt", "stepped", "stepped.ckpt"]


def test_imagenet21k_config_parses_with_sharded_checkpoints(capsys):
    from vmoe.train.cli import main
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(Path(__file__).resolve().parents[1] / "configs" / "imagenet21k_wds_vmoe_b16.yaml"),
              "--print_config"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "state_dict_type: sharded" in out and "num_classes: 21843" in out and "name: wds/imagenet21k" in out


if __name__ == "__main__":
    stage, out = sys.argv[1], Path(sys.argv[2])
    if stage == "two":
        fit(out, "ep2", 2, "ddp", 2)
    else:
        ckpt, steps, strategy_name, ep_size, name = sys.argv[3:8]
        fit(out, name, int(steps), strategy_name, int(ep_size), Path(ckpt), num_nodes=2)


def test_a_sharded_directory_without_a_sharded_strategy_is_refused_with_the_consolidate_command(tmp_path, capsys):
    """Lightning would end in IsADirectoryError; the CLI says to merge the directory first (vmoe consolidate)."""
    from vmoe.cli import COMMANDS, main
    from vmoe.distributed.dcp import META_FILE
    from vmoe.train.cli import _check_sharded_checkpoint_fits

    ckpt = tmp_path / "last.ckpt"
    ckpt.mkdir()
    (ckpt / ".metadata").write_bytes(b"")
    torch.save({"hyper_parameters": {}}, ckpt / META_FILE)
    with pytest.raises(ValueError, match=r"sharded \(DCP\) checkpoint directory.*vmoe consolidate .*last.ckpt "
                                         r".*last.ckpt.full.ckpt"):
        _check_sharded_checkpoint_fits(str(ckpt), "ddp")
    sharded = {"class_path": "vmoe.distributed.ExpertParallelDDPStrategy", "init_args": {"state_dict_type": "sharded"}}
    _check_sharded_checkpoint_fits(str(ckpt), sharded)  # the strategy that reads it: no error
    from jsonargparse import Namespace
    _check_sharded_checkpoint_fits(str(ckpt), Namespace(class_path=sharded["class_path"],
                                                        init_args=Namespace(state_dict_type="sharded")))
    _check_sharded_checkpoint_fits(str(tmp_path / "nope.ckpt"), "ddp")  # not a directory: Lightning's own checks
    assert COMMANDS["consolidate"].target == "vmoe.distributed.dcp:main"
    with pytest.raises(SystemExit) as exit_info:
        main(["consolidate", "--help"])
    assert exit_info.value.code == 0 and "usage: vmoe consolidate" in capsys.readouterr().out
