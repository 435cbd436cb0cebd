"""Streaming data through TimmDataModule: WebDataset shards and Hugging Face datasets written here, trained on
through the CLI; per-epoch sample coverage with 2 ranks x 2 loader workers and a mid-epoch resume.

Sample k carries label k, so the labels of the training batches say which samples each rank saw
(``streaming_data.RecordTargets``). Needs the ``streaming`` extra (webdataset, datasets).
"""
import collections
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("webdataset")
pytest.importorskip("datasets")

import streaming_data  # noqa: E402
from streaming_data import read_targets, write_hf, write_wds  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = {"backbone": "vit_tiny_patch16_224", "moe_layers": [1], "num_experts": 4, "k": 2,
              "model_kwargs": {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0},
              "optimizer": "adamw", "lr": 0.001, "warmup_steps": 0}
CLI_TIMEOUT_S = 300


def write_config(path: Path, data: dict, devices: int, strategy: str | dict = "auto") -> Path:
    import yaml
    config = {"seed_everything": 0, "model": TINY_MODEL,
              "trainer": {"accelerator": "cpu", "devices": devices, "strategy": strategy, "logger": False,
                          "enable_progress_bar": False, "enable_model_summary": False},
              "data": {"class_path": "vmoe.train.data.TimmDataModule",
                       "init_args": {"img_size": 8, "batch_size": 4, **data}}}
    path.write_text(yaml.safe_dump(config))
    return path


def fit(config: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    env.pop("VMOE_DEBUG", None)
    cmd = [sys.executable, "-m", "vmoe.train.cli", "fit", "--config", str(config), "--trainer.default_root_dir",
           str(out), "--trainer.callbacks+=streaming_data.RecordTargets", "--trainer.callbacks.out_dir",
           str(out / "targets"), *args]
    # A session of its own: on a timeout the whole group goes, the ranks Lightning started included.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=CLI_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, stdout[-2000:] + stderr[-4000:]
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def counts(rows: list[dict]) -> collections.Counter:
    return collections.Counter(t for row in rows for t in row["targets"])


def test_wds_two_ranks_two_workers_cli_each_sample_once_per_epoch_and_mid_epoch_resume(tmp_path):
    """64 samples in 8 shards of 8, 2 ranks x 2 workers = 4 global workers of 2 shards (16 samples, 4 batches
    of 4) each: timm's even case. Fit stops at step 3 (mid-epoch 0), then resumes to the end of epoch 1.
    The runs write sharded (DCP) checkpoints, so this also resumes a DCP directory through ``vmoe fit``."""
    from vmoe.distributed import dcp_to_checkpoint
    data = tmp_path / "shards"
    write_wds(data, "train", [8] * 8)
    write_wds(data, "validation", [4] * 4, start=0)
    strategy = {"class_path": "vmoe.distributed.ExpertParallelDDPStrategy", "init_args": {"state_dict_type": "sharded"}}
    config = write_config(tmp_path / "tiny.yaml", {"name": "wds/tiny", "root": str(data), "num_classes": 64,
                                                   "num_workers": 2}, devices=2, strategy=strategy)
    first = tmp_path / "first"
    fit(config, first, "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0")
    before = read_targets(first / "targets")
    assert [(r["rank"], r["batch_idx"]) for r in before] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]

    second = tmp_path / "second"
    run = fit(config, second, "--trainer.max_epochs", "2", "--ckpt_path", str(first / "checkpoints" / "last.ckpt"))
    assert "resuming from a checkpoint that ended before the epoch ended" in run.stderr  # Lightning says so
    after = read_targets(second / "targets")
    epoch0 = [r for r in after if r["epoch"] == 0]
    epoch1 = [r for r in after if r["epoch"] == 1]
    # The resumed epoch has the 5 batches per rank it lacked, but the stream restarts the epoch from its first
    # sample: the 3 batches per rank trained before the checkpoint come again, the epoch's last 3 never come.
    assert sorted(r["batch_idx"] for r in epoch0 if r["rank"] == 0) == [3, 4, 5, 6, 7]
    for rank in (0, 1):
        replayed = [r["targets"] for r in epoch0 if r["rank"] == rank][:3]
        assert replayed == [r["targets"] for r in before if r["rank"] == rank]
    seen0 = counts(before) + counts(epoch0)
    assert (len(seen0), sorted(collections.Counter(seen0.values()).items())) == (40, [(1, 16), (2, 24)])
    # The next epoch is whole: every sample exactly once over the 2 ranks, in a new shard order.
    seen1 = counts(epoch1)
    assert seen1 == collections.Counter(range(64))
    assert {t for r in epoch1 if r["rank"] == 0 for t in r["targets"]}.isdisjoint(
        t for r in epoch1 if r["rank"] == 1 for t in r["targets"])
    assert [r["targets"] for r in epoch1 if r["rank"] == 0][:3] != [r["targets"] for r in before if r["rank"] == 0]
    # The sharded last.ckpt of the resumed run converts to one file with the full expert set at step 16.
    one = torch.load(dcp_to_checkpoint(second / "checkpoints" / "last.ckpt", tmp_path / "one.ckpt"), weights_only=False)
    assert one["global_step"] == 16 and one["state_dict"]["model.blocks.1.mlp.experts.fc1_weight"].shape[0] == 4


def simulated_epoch(name: str, root: Path, num_classes: int, world: int = 2, workers: int = 2, epoch: int = 0,
                    **kwargs) -> collections.Counter:
    """Labels seen in one epoch by ``world`` ranks x ``workers`` loader workers, the ranks run one after the
    other in this process (the reader's rank and world size set as a process group would set them)."""
    from vmoe.train.data import TimmDataModule
    seen = collections.Counter()
    for rank in range(world):
        dm = TimmDataModule(str(root), name=name, num_classes=num_classes, img_size=8, batch_size=4,
                            num_workers=workers, **kwargs)
        dm.setup("fit")
        dm.train_set.reader.dist_rank, dm.train_set.reader.dist_num_replicas = rank, world
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)  # what Lightning calls each epoch
        for _, y in loader:
            seen.update(y.tolist())
    return seen


def test_wds_uneven_shards_follow_timms_rule(tmp_path):
    """60 samples in 6 shards of 10 over 4 global workers: each worker yields ceil(60/4)=15 -> 16 samples (a
    multiple of the batch); 2 workers hold 2 shards (20 samples: 4 skipped each), 2 hold 1 shard (10: 6
    repeated each). So 52 distinct samples, 12 of them twice, 8 not at all."""
    write_wds(tmp_path, "train", [10] * 6)
    write_wds(tmp_path, "validation", [4])
    seen = simulated_epoch("wds/tiny", tmp_path, 60)
    assert sum(seen.values()) == 64
    assert (len(seen), sorted(collections.Counter(seen.values()).items())) == (52, [(1, 40), (2, 12)])


def test_hfids_two_ranks_two_workers_each_sample_once(tmp_path):
    """A Hugging Face dataset of 4 parquet files streamed (hfids/) by 2 ranks x 2 workers: each sample once."""
    write_hf(tmp_path / "hf", {"train": 64, "validation": 16})
    for epoch in (0, 1):
        seen = simulated_epoch(f"hfids/{tmp_path / 'hf'}", tmp_path / "cache", 64, epoch=epoch, train_num_samples=64,
                               eval_num_samples=16)
        assert seen == collections.Counter(range(64)), epoch


def test_hfds_through_the_cli_one_epoch_each_sample_once(tmp_path):
    """hfds/ is map-style: the usual resumable sampler (and DistributedSampler under DDP) covers each sample."""
    write_hf(tmp_path / "hf", {"train": 32, "validation": 8})
    config = write_config(tmp_path / "tiny.yaml", {"name": f"hfds/{tmp_path / 'hf'}", "root": str(tmp_path / "cache"),
                                                   "num_classes": 32, "num_workers": 0}, devices=1)
    fit(config, tmp_path / "run", "--trainer.max_epochs", "1")
    assert counts(read_targets(tmp_path / "run" / "targets")) == collections.Counter(range(32))
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def test_num_samples_only_for_streaming_readers(tmp_path):
    from vmoe.train.data import TimmDataModule
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="train_num_samples / eval_num_samples apply to streaming.*name=''"):
        TimmDataModule(str(tmp_path), train_num_samples=10)
    assert streaming_data.RecordTargets(str(tmp_path)).out_dir == tmp_path
