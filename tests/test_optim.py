"""The fits' Adam (torch operations, the native step of cuda_ext/optim_cpu.cpp, and the capturable
step that keeps its counts on the device) against torch.optim.Adam, and its state round trip (used
by rollback)."""

import copy

import pytest
import torch

from neuralfield_reg._cuda_ext import load
from neuralfield_reg._optim import Adam


def _parameters(seed, rows=64, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, 2, generator=generator, dtype=dtype).requires_grad_(),
            torch.randn(8, generator=generator, dtype=dtype).requires_grad_(),
            torch.randn(3, 3, generator=generator, dtype=dtype).requires_grad_()]


def _loss(parameters, step):
    table, bias, matrix = parameters
    # sparse rows in the table (as a hash table's step touches few rows), a varying objective
    rows = table[step % 7::5]
    return (rows.sin().square().sum() + (bias - step * 0.1).square().sum() + (matrix @ matrix.T).trace())


# (kernels, capturable, rows of the table, dtype, tolerance): the native step in float64 agrees to
# rounding; in float32 the sums are rounded in another order (and fused) than torch's, and with
# 40000 rows it runs on several threads
CASES = {"torch ops": (False, False, 64, torch.float64, 1e-12), "native": (True, False, 64, torch.float64, 1e-12),
         "native float32, threads": (True, False, 40000, torch.float32, 1e-5),
         "capturable": (False, True, 64, torch.float64, 1e-12),
         "capturable float32": (False, True, 64, torch.float32, 1e-5)}


def _set_learning_rate(optimizer, value):
    if isinstance(optimizer, Adam):
        optimizer.set_learning_rate(value)
    else:
        optimizer.param_groups[0]["lr"] = value


@pytest.mark.parametrize("case", sorted(CASES))
def test_adam_matches_torch_adam_with_a_learning_rate_schedule(case):
    native, capturable, rows, dtype, tolerance = CASES[case]
    ours, theirs = _parameters(0, rows, dtype), _parameters(0, rows, dtype)
    mine = Adam(ours, 0.05, kernels=load() if native else None, capturable=capturable)
    reference = torch.optim.Adam(theirs, lr=0.05)
    for step in range(40):
        for optimizer, parameters in ((mine, ours), (reference, theirs)):
            _set_learning_rate(optimizer, 0.05 * (1 - step / 50))
            optimizer.zero_grad(set_to_none=True)
            _loss(parameters, step).backward()
            if step % 9 == 3:               # a parameter without a gradient at a step is left alone
                parameters[1].grad = None
            optimizer.step()
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, rtol=0, atol=tolerance), (a - b).abs().max()
    assert not torch.equal(ours[0], _parameters(0, rows, dtype)[0])      # the steps did move the table


@pytest.mark.parametrize("kind", ["torch ops", "native", "capturable"])
def test_adam_state_round_trip_restores_the_trajectory(kind):
    parameters = _parameters(1)
    optimizer = Adam(parameters, 0.1, kernels=load() if kind == "native" else None, capturable=kind == "capturable")
    state_tensors = [t.data_ptr() for t in optimizer.first + optimizer.second]
    for step in range(5):
        optimizer.zero_grad()
        _loss(parameters, step).backward()
        optimizer.step()
    saved_parameters = [p.detach().clone() for p in parameters]
    saved = copy.deepcopy(optimizer.state_dict())
    trajectories = []
    for attempt in range(2):
        with torch.no_grad():
            for p, value in zip(parameters, saved_parameters):
                p.copy_(value)
        optimizer.load_state_dict(saved)
        for step in range(5, 10):
            optimizer.zero_grad()
            _loss(parameters, step).backward()
            optimizer.step()
        trajectories.append([p.detach().clone() for p in parameters])
    for a, b in zip(*trajectories):
        assert torch.equal(a, b)
    # the state is restored into the same tensors (a captured step keeps reading them)
    assert [t.data_ptr() for t in optimizer.first + optimizer.second] == state_tensors


def test_capturable_adam_reads_its_learning_rate_from_the_device_tensor():
    parameters = _parameters(2)
    optimizer = Adam(parameters, 0.1, capturable=True)
    optimizer.set_learning_rate(0.0)
    before = [p.detach().clone() for p in parameters]
    _loss(parameters, 0).backward()
    optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(parameters, before))     # zero learning rate: no move
    assert all(float(step) == 1 for step in optimizer.steps)                 # but the step was counted


@pytest.mark.parametrize("kind", ["torch ops", "native", "native float32", "capturable"])
def test_skip_zero_matches_torch_sparse_adam(kind):
    """With ``skip_zero`` an entry whose gradient is 0 at a step keeps its value and moments: the
    lazy update of ``torch.optim.SparseAdam`` (given the same gradients as sparse tensors). The
    table's loss reads a different fifth of its rows at each step, so most rows skip most steps.
    SparseAdam adds eps before the bias correction, Adam after: with a negligible eps they agree."""
    dtype, tolerance = (torch.float32, 1e-5) if kind.endswith("float32") else (torch.float64, 1e-12)
    ours, theirs = _parameters(3, dtype=dtype), _parameters(3, dtype=dtype)
    mine = Adam(ours, 0.05, eps=1e-30, kernels=load() if kind.startswith("native") else None,
                capturable=kind == "capturable", skip_zero=True)
    reference = torch.optim.SparseAdam(theirs, lr=0.05, eps=1e-30)
    untouched = []
    for step in range(40):
        _set_learning_rate(mine, 0.05 * (1 - step / 50))
        _set_learning_rate(reference, 0.05 * (1 - step / 50))
        for optimizer, parameters in ((mine, ours), (reference, theirs)):
            optimizer.zero_grad(set_to_none=True)
            _loss(parameters, step).backward()
        for parameter in theirs:
            parameter.grad = parameter.grad.to_sparse()
        skipped = ours[0].grad == 0
        before = ours[0].detach().clone()
        mine.step()
        reference.step()
        untouched.append(bool(torch.equal(ours[0].detach()[skipped], before[skipped])) and bool(skipped.any()))
    assert all(untouched)
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, rtol=0, atol=tolerance), (a - b).abs().max()
    dense = _parameters(3, dtype=dtype)
    plain = Adam(dense, 0.05, eps=1e-30)
    for step in range(40):
        _set_learning_rate(plain, 0.05 * (1 - step / 50))
        plain.zero_grad(set_to_none=True)
        _loss(dense, step).backward()
        plain.step()
    assert not torch.allclose(dense[0], ours[0], atol=1e-6)      # the dense update differs (the test can fail)
