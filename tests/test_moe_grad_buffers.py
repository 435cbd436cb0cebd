"""Weight-gradient memory reuse on the sorted expert path: reused only when nothing else can see it."""
import copy
import io
import pickle

import pytest
import torch

from vmoe.moe import StackedExperts
from vmoe.moe.grad_buffers import GradientBuffers

COUNTS = [5, 0, 7, 4]  # expert 1 idle: its gradient rows must still come out zero


def make(reuse: bool) -> StackedExperts:
    torch.manual_seed(0)
    return StackedExperts(len(COUNTS), 8, 12, reuse_grad_memory=reuse)


def backward(experts: StackedExperts, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(COUNTS), 8, generator=g, requires_grad=True)
    assert experts.sorted_path(x) == "blocks"
    (experts(x, COUNTS) * torch.randn(sum(COUNTS), 8, generator=g)).sum().backward()


def grads(experts: StackedExperts) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in experts.named_parameters()}


def test_memory_is_reused_once_the_gradient_is_set_to_none():
    experts = make(True)
    backward(experts, 1)
    ptr = experts.fc1_weight.grad.data_ptr(), experts.fc2_weight.grad.data_ptr()
    experts.zero_grad(set_to_none=True)
    backward(experts, 2)
    assert (experts.fc1_weight.grad.data_ptr(), experts.fc2_weight.grad.data_ptr()) == ptr
    reference = make(False)
    backward(reference, 2)
    for name, grad in grads(reference).items():
        torch.testing.assert_close(grads(experts)[name], grad, rtol=0, atol=0)
    assert experts.fc1_weight.grad[1].abs().sum() == 0


@pytest.mark.parametrize("keep", ["grad", "view", "detached"])
def test_a_gradient_still_referenced_is_never_overwritten(keep):
    experts = make(True)
    backward(experts, 1)
    kept = {"grad": lambda g: g, "view": lambda g: g.view(-1), "detached": lambda g: g.detach()}[keep](
        experts.fc1_weight.grad)
    before = kept.clone()
    experts.zero_grad(set_to_none=True)
    backward(experts, 2)
    torch.testing.assert_close(kept, before, rtol=0, atol=0)
    assert experts.fc1_weight.grad.data_ptr() != kept.data_ptr()


def test_gradient_accumulation_without_zero_grad_sums_like_plain_autograd():
    experts, reference = make(True), make(False)
    for module in (experts, reference):
        for seed in (1, 2, 3):
            backward(module, seed)
    for name, grad in grads(reference).items():
        torch.testing.assert_close(grads(experts)[name], grad)


def test_a_layer_used_twice_in_one_graph():
    experts, reference = make(True), make(False)
    for module in (experts, reference):
        for _ in range(2):  # the second round runs on the memory the first one left
            module.zero_grad(set_to_none=True)
            x = torch.randn(sum(COUNTS), 8, generator=torch.Generator().manual_seed(5))
            module(module(x, COUNTS), COUNTS).square().sum().backward()
    for name, grad in grads(reference).items():
        torch.testing.assert_close(grads(experts)[name], grad)


def test_copies_of_the_module_carry_no_buffers():
    experts = make(True)
    backward(experts, 1)
    assert len(experts.grad_buffers) == 2
    assert len(copy.deepcopy(experts).grad_buffers) == 0
    assert len(pickle.loads(pickle.dumps(experts)).grad_buffers) == 0
    blob = io.BytesIO()
    torch.save(experts.state_dict(), blob)
    assert set(torch.load(io.BytesIO(blob.getvalue()))) == {"fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"}


def test_switched_off_and_off_the_cpu():
    with pytest.raises(ValueError, match="reuse_grad_memory must be True or False, got 'no'"):
        StackedExperts(2, 8, 12, reuse_grad_memory="no")
    experts = make(False)
    backward(experts, 1)
    assert experts.grad_buffers is None
    buffers = GradientBuffers()
    like = torch.empty(3, 4, device="meta")
    assert not buffers.applies_to(like)
    assert buffers.empty_like("w", like).device.type == "meta" and len(buffers) == 0


def test_a_buffer_of_another_shape_is_not_handed_out():
    buffers = GradientBuffers()
    first = buffers.empty_like("w", torch.empty(4, 5))
    ptr = first.data_ptr()
    del first
    assert buffers.empty_like("w", torch.empty(4, 5)).data_ptr() == ptr
    assert buffers.empty_like("w", torch.empty(2, 5)).shape == (2, 5)
    assert buffers.empty_like("w", torch.empty(2, 5, dtype=torch.float64)).dtype == torch.float64


def test_buffers_are_freed_for_evaluation_and_on_a_move():
    experts = make(True)
    backward(experts, 1)
    assert len(experts.grad_buffers) == 2
    experts.eval()
    assert len(experts.grad_buffers) == 0
    experts.train()
    backward(experts, 1)
    assert len(experts.grad_buffers) == 2
    experts.double()
    assert len(experts.grad_buffers) == 0
