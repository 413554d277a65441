"""The fit step over fixed buffers (engine/static_step.py) against the plain loop.

On the CPU the static step runs eagerly, so these tests check everything but the capture: its
buffers follow the loop's inputs (images, level weights, draws), the capturable Adam, the terms
taken before the update, and rollback. The CUDA tests (skipped without a device) compare fits with
and without CUDA graphs.
"""

import dataclasses
import warnings

import numpy as np
import pytest
import torch

import neuralfield_reg as nfr
import neuralfield_reg.registration.fit as fit_module
from neuralfield_reg._graphs import CapturedStep
from neuralfield_reg._optim import Adam
from neuralfield_reg.data import Shape
from neuralfield_reg.engine import StaticStep
from neuralfield_reg.metrics import mean_dice
from torch.utils._python_dispatch import TorchDispatchMode


@pytest.fixture(scope="module")
def pair64():
    moving, moving_labels = Shape("triangle", (0.52, 0.47), 0.3, 0.4).render(64)
    fixed, fixed_labels = Shape("circle", (0.5, 0.55), 0.27, 0.0).render(64)
    return moving, fixed, moving_labels, fixed_labels


def _volumes():
    moving = np.zeros((20, 22, 18), np.float32)
    fixed = np.zeros_like(moving)
    moving[5:13, 6:15, 5:12] = 1.0
    fixed[7:15, 6:16, 6:13] = 1.0
    return moving + 0.1, fixed + 0.1


def _fit(monkeypatch, static: bool, *args, **options):
    monkeypatch.setattr(fit_module, "use_static_step", lambda config, device, backend: static)
    return nfr.fit_pair(*args, progress=False, **options)


def _assert_close_fits(first, second, tolerance):
    assert first.history.keys() == second.history.keys()
    for name in first.history:
        np.testing.assert_allclose(first.history[name], second.history[name], rtol=tolerance, atol=1e-7,
                                   err_msg=name)
    for (name, a), b in zip(first.maps.state_dict().items(), second.maps.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=tolerance * max(1.0, float(a.abs().max())), msg=name)


CASES = {
    # 2D: the whole image per step, the 2D preset
    "2d": dict(preset="2d", config=dict(iterations=30)),
    # 3D: random voxels inside masks, diffusion, a blur stage change, weight averaging
    "3d": dict(preset="3d", config=dict(iterations=24, similarity_points=300, gradient_icon_points=128,
                                        diffusion_weight=0.5, blur_sigmas=(1.0, 0.0), average_last=0.25,
                                        affine=None)),
    # 3D, two pairs in one batch, LNCC on random patches
    "3d batch lncc patches": dict(preset="3d", config=dict(iterations=12, similarity="lncc", lncc_patches=4,
                                                           lncc_patch_size=6, lncc_window=3, gradient_icon_points=64,
                                                           affine=None)),
}


def _fit_case(monkeypatch, case: str, static: bool, seed: int, pair64):
    spec = CASES[case]
    config = dataclasses.replace(nfr.FitConfig.preset(spec["preset"]), fused_kernels=False, **spec["config"])
    monkeypatch.setattr(fit_module, "use_static_step", lambda config, device, backend: static)
    if case == "2d":
        return [nfr.fit_pair(*pair64[:2], config, seed=seed, progress=False)]
    moving, fixed = _volumes()
    if case == "3d":
        fixed_mask = np.ones(fixed.shape, bool)
        fixed_mask[:, :, :3] = False
        return [nfr.fit_pair(moving, fixed, config, seed=seed, progress=False, moving_mask=moving > 0.5,
                             fixed_mask=fixed_mask)]
    return nfr.fit_pairs([moving, fixed], [fixed, np.roll(moving, 2, 0)], config, seed=seed, progress=False)


@pytest.mark.parametrize("case", sorted(CASES))
def test_static_step_follows_the_plain_loop(pair64, monkeypatch, case):
    """Same seed, same autograd objective: the static step's fit retraces the plain loop's (the
    Adam updates round differently, hence a tolerance, far below what a stale buffer would give)."""
    plain = _fit_case(monkeypatch, case, False, 2, pair64)
    static = _fit_case(monkeypatch, case, True, 2, pair64)
    for first, second in zip(plain, static, strict=True):
        _assert_close_fits(first, second, 1e-4)
    # a different draw changes the fit far beyond that tolerance (the check can fail)
    other = _fit_case(monkeypatch, case, True, 3, pair64)
    assert not np.allclose(other[0].history["similarity"], plain[0].history["similarity"], rtol=1e-3)


# Operations that read a tensor on the host (a synchronisation, and no graph can capture it; on the
# GPU linalg's error checks read its info tensor), make a tensor from host data (a host-to-device
# copy), or have an output size that depends on values.
HOST_READS = ("aten._local_scalar_dense", "aten.lift_fresh", "aten.nonzero", "aten.masked_select", "aten.masked_scatter",
              "aten.unique", "aten._unique", "aten.repeat_interleave.Tensor", "aten.item", "aten.is_nonzero",
              "aten.equal", "aten.bincount", "aten._linalg_check_errors")   # the last: linalg's error checks


class _OperationLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.bad: list[str] = []
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        self.count += 1
        boolean_index = name.startswith("aten.index") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else []) or [])
        if name.startswith(HOST_READS) or boolean_index or (name.startswith("aten._to_copy") and "device" in kwargs):
            self.bad.append(name)
        return func(*args, **kwargs)


def _logging_captured_steps(monkeypatch) -> list:
    """Every step a CapturedStep runs, run under an :class:`_OperationLog` (one per call) and a
    ``meta`` default device; returns the logs."""
    logs = []
    original = CapturedStep.__init__

    def init(self, step, *args, **kwargs):
        def logged():
            logs.append(_OperationLog())
            with logs[-1], torch.device("meta"):
                return step()
        original(self, logged, *args, **kwargs)
    monkeypatch.setattr(CapturedStep, "__init__", init)
    return logs


@pytest.mark.parametrize("case", ["2d", "3d", "2d lncc icon mi", "2d torch backend"])
def test_the_captured_step_reads_nothing_from_the_host(pair64, monkeypatch, case):
    """What a CUDA graph captures (objective, backward, Adam) must launch device work only. On the
    CPU: no operation of the step reads a value on the host or makes a tensor from host data, and
    none makes a tensor without naming the device (under a ``meta`` default device such a tensor
    would meet the CPU tensors and fail)."""
    if case == "3d":
        moving, fixed = _volumes()
        config = dataclasses.replace(nfr.FitConfig.preset("3d"), iterations=2, affine=None, similarity_points=200)
        options = dict(moving_mask=moving > 0.5)
    else:
        moving, fixed = pair64[:2]
        config = dataclasses.replace(nfr.FitConfig(), iterations=2)
        if case == "2d lncc icon mi":
            config = dataclasses.replace(config, similarity="lncc", icon_weight=0.5)
        if case == "2d torch backend":
            config = dataclasses.replace(config, backend="torch")
        options = {}
    logs = _logging_captured_steps(monkeypatch)
    _fit(monkeypatch, True, moving, fixed, dataclasses.replace(config, fused_kernels=False), **options)
    if case == "2d lncc icon mi":
        _fit(monkeypatch, True, moving, fixed, dataclasses.replace(config, similarity="mi", fused_kernels=False))
    assert logs and all(log.count > 100 for log in logs)
    assert [log.bad for log in logs] == [[]] * len(logs)


@pytest.mark.parametrize("case", ["2d moments ncc", "2d moments mi", "3d start mi masks"])
def test_the_captured_affine_steps_read_nothing_from_the_host(pair64, monkeypatch, case):
    """The affine stage's steps (search, rigid and affine refinement) as captured on a GPU: no host
    reads, and the same transform as the eager path with the plain Adam (up to rounding)."""
    from neuralfield_reg.registration.affine import AffineTransform, fit_affine
    cost = case.split()[2]
    config = dataclasses.replace(nfr.FitConfig.preset(case[:2]).affine, refinement_cost=cost)
    if case.startswith("2d"):
        moving, fixed = (torch.from_numpy(image) for image in pair64[:2])
        options = dict(extent_moving=(63.0, 63.0), extent_fixed=(63.0, 63.0))
    else:
        moving, fixed = (torch.from_numpy(image).double() for image in _volumes())
        extent = tuple(float(n - 1) for n in moving.shape)
        options = dict(extent_moving=extent, extent_fixed=extent, masks=(moving > 0.5, None),
                       start=AffineTransform(torch.eye(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64),
                                             extent, extent))
    plain = fit_affine(moving, fixed, config=config, **options)
    logs = _logging_captured_steps(monkeypatch)
    graphed = fit_affine(moving, fixed, config=config, cuda_graphs=True, **options)
    expected = (config.search_iterations if case.startswith("2d") else config.rigid_iterations) + config.iterations
    assert len(logs) == expected and all(log.count > 20 for log in logs)
    assert [log.bad for log in logs] == [[]] * len(logs)
    # The capturable Adam rounds differently; over 240 steps the 2D MI search amplifies that to ~5e-4
    # (its histogram weights jump where a value crosses a bin), the others stay at rounding level.
    tolerance = 2e-3 if case == "2d moments mi" else 1e-9
    torch.testing.assert_close(graphed.linear, plain.linear, rtol=0, atol=tolerance)
    torch.testing.assert_close(graphed.translation, plain.translation, rtol=0, atol=50 * tolerance)   # voxels


def test_static_step_rolls_back_from_a_diverging_learning_rate(pair64, monkeypatch):
    """lr 1e5: the first update throws the maps out of the image; the state kept before it
    (iteration 0) is restored with the rate scaled to 1e-2, and the fit ends as an ordinary one."""
    moving, fixed, moving_labels, fixed_labels = pair64
    config = dataclasses.replace(nfr.FitConfig(), iterations=150, blur_sigmas=(3.0, 1.5, 0.75, 0.0),
                                 learning_rate=1e5, on_divergence="rollback", rollback_factor=1e-7,
                                 fused_kernels=False)
    result = _fit(monkeypatch, True, moving, fixed, config)
    assert [r["iteration"] for r in result.metadata["rollbacks"]] == [0]
    assert len(result.history["loss"]) == 150 and np.isfinite(result.history["loss"]).all()
    assert mean_dice(result.warp(moving_labels, mode="nearest"), fixed_labels) > 0.93


def test_static_step_needs_a_capturable_optimizer(pair64):
    parameters = [torch.zeros(3, requires_grad=True)]
    with pytest.raises(ValueError, match="optimizer: expected a capturable Adam"):
        StaticStep(objective=None, optimizer=Adam(parameters, 0.1), parameters=parameters, capture=False)


def test_cuda_graphs_setting_is_checked():
    assert nfr.FitConfig().cuda_graphs is True
    with pytest.raises((TypeError, ValueError), match="cuda_graphs"):
        nfr.FitConfig(cuda_graphs="yes")


def _recording_static_steps(monkeypatch):
    made = []
    original = StaticStep.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(self)
    monkeypatch.setattr(StaticStep, "__init__", init)
    return made


@pytest.mark.cuda
@pytest.mark.parametrize("dim", [2, 3])
def test_cuda_graph_fit_matches_the_eager_fit(pair64, monkeypatch, dim):
    """The captured step gives the eager step's fit (hash-table gradients are summed with atomics
    in either, so the two agree closely, not bit for bit), and it was captured, without warning."""
    if dim == 2:
        moving, fixed = pair64[:2]
        config = dataclasses.replace(nfr.FitConfig(), iterations=60)
    else:
        moving, fixed = _volumes()
        config = dataclasses.replace(nfr.FitConfig.preset("3d"), iterations=60, affine=None)
    made = _recording_static_steps(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        graphed = nfr.fit_pair(moving, fixed, config, device="cuda", progress=False, seed=1)
    eager = nfr.fit_pair(moving, fixed, dataclasses.replace(config, cuda_graphs=False), device="cuda",
                         progress=False, seed=1)
    assert len(made) == 1 and made[0].runner.graph is not None and made[0].runner.calls == 60
    np.testing.assert_allclose(graphed.history["loss"][:10], eager.history["loss"][:10], rtol=1e-3)
    np.testing.assert_allclose(graphed.history["loss"][-10:], eager.history["loss"][-10:], rtol=0.05)
    assert np.abs(graphed.warp(moving) - eager.warp(moving)).max() < 0.05


@pytest.mark.cuda
def test_cuda_graph_fit_rolls_back_and_batches(pair64, monkeypatch):
    """A rollback restores the state the graph reads in place (the fit goes on from it), and a
    batch of pairs is one graph."""
    moving, fixed, moving_labels, fixed_labels = pair64
    config = dataclasses.replace(nfr.FitConfig(), iterations=150, blur_sigmas=(3.0, 1.5, 0.75, 0.0),
                                 learning_rate=1e5, on_divergence="rollback", rollback_factor=1e-7)
    made = _recording_static_steps(monkeypatch)
    result = nfr.fit_pair(moving, fixed, config, device="cuda", progress=False)
    assert made[0].runner.graph is not None
    assert [r["iteration"] for r in result.metadata["rollbacks"]] == [0]
    assert mean_dice(result.warp(moving_labels, mode="nearest"), fixed_labels) > 0.93
    quick = dataclasses.replace(nfr.FitConfig(), iterations=40)
    movings, fixeds = [moving, fixed, moving], [fixed, moving, np.roll(fixed, 3, 0)]
    batch = nfr.fit_pairs(movings, fixeds, quick, device="cuda", progress=False)
    assert made[-1].runner.graph is not None and made[-1].runner.calls == 40
    eager = nfr.fit_pairs(movings, fixeds, dataclasses.replace(quick, cuda_graphs=False), device="cuda",
                          progress=False)
    for one, other in zip(batch, eager):
        np.testing.assert_allclose(one.history["loss"][:10], other.history["loss"][:10], rtol=1e-3)
