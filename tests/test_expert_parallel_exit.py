"""`vmoe fit` with 2 expert-parallel processes exits 0 every time: the gloo process groups (default and expert
groups) are destroyed while the interpreter is whole, not torn down during its finalization (SIGABRT,
`terminate called without an active exception`)."""
import os
import socket
import subprocess
import sys

from hostile import ROOT, run_python

QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
EXPERT_PARALLEL = str(ROOT / "configs" / "quickstart_expert_parallel.yaml")
TINY = ["--data.init_args.img_size", "8", "--data.init_args.batch_size", "16",
        "--model.model_kwargs", '{"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0}',
        "--model.num_experts", "4", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
        "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
RUNS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_process_groups_are_destroyed_before_interpreter_shutdown():
    code = ("import atexit, os, tempfile, torch.distributed as dist\n"
            "from vmoe.distributed.shutdown import destroy_process_groups_at_exit\n"
            "dist.init_process_group('gloo', init_method='file://' + tempfile.mktemp(), rank=0, world_size=1)\n"
            "group = dist.new_group([0])\n"
            "atexit.register(lambda: print('initialized at exit:', dist.is_initialized(), flush=True))\n"
            "destroy_process_groups_at_exit(); destroy_process_groups_at_exit()  # registered once\n")
    proc = run_python(code, timeout=120)
    assert proc.returncode == 0 and "initialized at exit: False" in proc.stdout, proc.stdout + proc.stderr[-2000:]


def test_two_process_expert_parallel_fit_exits_zero_every_time(tmp_path):
    # The runs go side by side (each on its own port) to keep the wall time down on a small machine.
    procs = []
    for i in range(RUNS):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "MASTER_PORT": str(_free_port())}
        env.pop("VMOE_DEBUG", None)
        args = ["fit", "--config", QUICKSTART, "--config", EXPERT_PARALLEL, *TINY,
                "--trainer.default_root_dir", str(tmp_path / f"run{i}")]
        procs.append(subprocess.Popen([sys.executable, "-m", "vmoe", *args], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    results = [(proc.communicate(timeout=300)[0], proc.returncode) for proc in procs]
    for i, (out, code) in enumerate(results):
        assert code == 0 and "terminate called" not in out, f"run {i}: exit {code}\n{out[-3000:]}"
        assert (tmp_path / f"run{i}" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt").is_file()
