"""Pins on the non-public behaviour ExpertParallelDDPStrategy (vmoe/distributed/strategy.py) relies on.

Neither Lightning nor torch has a public way to keep parameters out of DDP's gradient all-reduce, which the
sharded experts need (each rank holds different experts). The strategy shards the experts in
``model_to_device`` and marks them with torch's ``DistributedDataParallel._set_params_and_buffers_to_ignore_
for_model``; these tests fail as soon as Lightning or torch change what that relies on, naming what moved.
"""
import inspect
import socket

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from vmoe.distributed import ExpertParallelDDPStrategy


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_lightning_moves_the_model_before_wrapping_it_in_torch_ddp():
    setup = inspect.getsource(DDPStrategy.setup)
    assert "self.model_to_device()" in setup and "self.configure_ddp()" in setup, \
        "Lightning's DDPStrategy.setup changed: ExpertParallelDDPStrategy shards experts in model_to_device"
    assert setup.index("self.model_to_device()") < setup.index("self.configure_ddp()"), \
        "Lightning now wraps in DDP before model_to_device: the experts would be sharded after DDP saw them"
    assert "DistributedDataParallel(" in inspect.getsource(DDPStrategy._setup_model), \
        "Lightning's DDPStrategy no longer wraps with torch DistributedDataParallel"
    assert "model_to_device" in ExpertParallelDDPStrategy.__dict__  # the override this relies on


def test_torch_ddp_leaves_the_marked_parameters_out_of_its_reduction():
    assert callable(getattr(DistributedDataParallel, "_set_params_and_buffers_to_ignore_for_model", None)), \
        "torch removed DistributedDataParallel._set_params_and_buffers_to_ignore_for_model"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ["1.weight"])
        ddp = DistributedDataParallel(model)
        assert "1.weight" in ddp.parameters_to_ignore
        reduced = {id(p) for p in ddp._module_parameters}
        assert id(model[1].weight) not in reduced and id(model[0].weight) in reduced
        ddp(torch.randn(4, 3)).sum().backward()  # the ignored parameter still gets its local gradient
        assert model[1].weight.grad is not None
    finally:
        dist.destroy_process_group()
