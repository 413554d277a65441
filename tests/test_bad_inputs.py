"""Bad inputs, entry point by entry point, as a hostile user would try them.

Each table row is (what is tried, the call, the error type, a fragment of the message). The
fit_pair images and FitConfig values are tabled in tests/test_fit.py; training data for the
convolutional companion in tests/test_gradicon.py.
"""

import numpy as np
import pytest
import torch

import neuralfield_reg as nfr
from neuralfield_reg import gradicon, metrics
from neuralfield_reg.geometry.coords import identity_grid, sample
from neuralfield_reg.encoders import make_encoding, resolve_backend
from neuralfield_reg.losses import gradient_icon_fd, lncc, ssd

TINY = nfr.FitConfig(iterations=2, affine=None, backend="torch", similarity_points=64, gradient_icon_points=16)


@pytest.fixture(scope="module")
def result():
    rng = np.random.default_rng(0)
    return nfr.fit_pair(rng.random((10, 12)), rng.random((8, 9)), TINY, progress=False)


RESULT_CASES = [
    ("warp: wrong shape", lambda r: r.warp(np.zeros((8, 9))), ValueError, r"moving image's shape \(10, 12\)"),
    ("warp: a list", lambda r: r.warp([[0.0] * 12] * 10), TypeError, "numpy array or a torch tensor"),
    ("warp: NaN", lambda r: r.warp(np.full((10, 12), np.nan)), ValueError, "NaN"),
    ("warp: complex", lambda r: r.warp(np.zeros((10, 12), complex)), TypeError, "real-valued"),
    ("warp: unknown mode", lambda r: r.warp(np.zeros((10, 12)), mode="cubic"), ValueError, "mode"),
    ("warp_inverse: the moving shape", lambda r: r.warp_inverse(np.zeros((10, 12))), ValueError, "fixed image's"),
    ("map_points: (K,) points", lambda r: r.map_points(np.zeros(2)), ValueError, r"points: expected shape \(K, 2\)"),
    ("map_points: 3D points", lambda r: r.map_points(np.zeros((4, 3))), ValueError, r"\(K, 2\)"),
    ("displacement: unknown direction", lambda r: r.displacement("BB"), ValueError, "direction"),
    ("jacobian: unknown direction", lambda r: r.jacobian_determinant("forward"), ValueError, "direction"),
    ("save: missing folder", lambda r: r.save("/nonexistent/folder/pair.pt"), FileNotFoundError, "does not exist"),
]


@pytest.mark.parametrize("what,call,error,fragment", RESULT_CASES, ids=[c[0] for c in RESULT_CASES])
def test_registration_result(result, what, call, error, fragment):
    with pytest.raises(error, match=fragment):
        call(result)


def test_registration_result_load(tmp_path):
    cases = {"missing": (tmp_path / "none.pt", FileNotFoundError, "no file"),
             "text": (tmp_path / "text.pt", ValueError, "not a readable"),
             "foreign": (tmp_path / "foreign.pt", ValueError, "not a neuralfield_reg result")}
    cases["text"][0].write_text("hello")
    torch.save({"weights": torch.zeros(3)}, cases["foreign"][0])
    for path, error, fragment in cases.values():
        with pytest.raises(error, match=fragment):
            nfr.RegistrationResult.load(path)


METRIC_CASES = [
    ("dice: shapes differ", lambda: metrics.dice(np.zeros((3, 3)), np.zeros((3, 4))), ValueError, "equal shapes"),
    ("dice: a list", lambda: metrics.dice([1, 2], np.zeros(2)), TypeError, "labels_a"),
    ("folding: empty", lambda: metrics.folding_fraction(np.zeros(0)), ValueError, "non-empty"),
    ("ICE: empty residual", lambda: metrics.inverse_consistency_error(np.zeros((0, 2))), ValueError, "residual"),
    ("TRE: shapes differ", lambda: metrics.target_registration_error(np.zeros((3, 2)), np.zeros((4, 2))),
     ValueError, r"equal \(K, d\)"),
]


@pytest.mark.parametrize("what,call,error,fragment", METRIC_CASES, ids=[c[0] for c in METRIC_CASES])
def test_metrics(what, call, error, fragment):
    with pytest.raises(error, match=fragment):
        call()


LOSS_CASES = [
    ("ssd: shapes differ", lambda: ssd(torch.zeros(3), torch.zeros(4)), ValueError, "equal shapes"),
    ("ssd: empty", lambda: ssd(torch.zeros(0), torch.zeros(0)), ValueError, "non-empty"),
    ("lncc: 1D", lambda: lncc(torch.zeros(9), torch.zeros(9)), ValueError, "2D or 3D"),
    ("lncc: even window", lambda: lncc(torch.zeros(9, 9), torch.zeros(9, 9), window=2), ValueError, "window"),
    ("gradicon fd: zero step", lambda: gradient_icon_fd(lambda x: x, lambda x: x, torch.rand(4, 2), step=0.0),
     ValueError, "step"),
    ("sample: 4D points", lambda: sample(torch.zeros(4, 4), torch.zeros(3, 4)), ValueError, "points"),
    ("sample: integer points", lambda: sample(torch.zeros(4, 4), torch.zeros(3, 2, dtype=torch.long)),
     TypeError, "floating"),
    ("sample: linear on labels", lambda: sample(torch.zeros(4, 4, dtype=torch.long), torch.zeros(3, 2)),
     TypeError, "nearest"),
    ("identity_grid: 1-voxel axis", lambda: identity_grid((1, 4)), ValueError, "at least 2 voxels"),
]


@pytest.mark.parametrize("what,call,error,fragment", LOSS_CASES, ids=[c[0] for c in LOSS_CASES])
def test_losses_and_coordinates(what, call, error, fragment):
    with pytest.raises(error, match=fragment):
        call()


ENCODER_CASES = [
    ("table too large", lambda: nfr.HashGridConfig(log2_hashmap_size=40), ValueError, "log2_hashmap_size"),
    ("no levels", lambda: nfr.HashGridConfig(n_levels=0), ValueError, "n_levels"),
    ("unknown interpolation", lambda: nfr.HashGridConfig(interpolation="cubic"), ValueError, "interpolation"),
    ("4D encoding", lambda: make_encoding(4), ValueError, "dim"),
    ("unknown backend", lambda: resolve_backend("cuda"), ValueError, "backend"),
    ("tcnn without tinycudann", lambda: resolve_backend("tcnn"), nfr.BackendUnavailableError, "tcnn"),
    ("points of the wrong width", lambda: make_encoding(2, backend="torch")(torch.rand(5, 3)), ValueError,
     r"points: expected shape \(N, 2\)"),
]


@pytest.mark.parametrize("what,call,error,fragment", ENCODER_CASES, ids=[c[0] for c in ENCODER_CASES])
def test_encoders(what, call, error, fragment):
    with pytest.raises(error, match=fragment):
        call()


GRADICON_CASES = [
    ("default_model: 1D", lambda: gradicon.default_model(1, (8,)), ValueError, "dim"),
    ("default_model: too many levels", lambda: gradicon.default_model(2, (8, 8), levels=5), ValueError, "levels"),
    ("UNet: no widths", lambda: gradicon.UNet(2, widths=()), ValueError, "widths"),
    ("register: not a network", lambda: gradicon.register(torch.nn.Linear(2, 2), np.zeros((8, 8)), np.zeros((8, 8))),
     TypeError, "network"),
    ("register: 2D and 3D", lambda: gradicon.register(gradicon.default_model(2, (8, 8), levels=1, widths=(4,)),
                                                      np.random.rand(8, 8), np.random.rand(8, 8, 8)),
     ValueError, "same number of axes"),
    ("registration_loss: channels", lambda: gradicon.registration_loss(
        gradicon.default_model(2, (8, 8), levels=1, widths=(4,)), torch.rand(2, 2, 8, 8), torch.rand(2, 2, 8, 8)),
     ValueError, r"\(B, 1, \*shape\)"),
]


@pytest.mark.parametrize("what,call,error,fragment", GRADICON_CASES, ids=[c[0] for c in GRADICON_CASES])
def test_gradicon(what, call, error, fragment):
    with pytest.raises(error, match=fragment):
        call()
