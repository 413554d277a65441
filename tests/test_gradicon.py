"""Convolutional GradICON companion: networks, map composition, losses, training, register."""

import copy

import numpy as np
import pytest
import torch

from neuralfield_reg import FitDivergedError, RegistrationResult, gradicon, metrics
from neuralfield_reg.geometry.coords import identity_grid
from neuralfield_reg.data import ShapePairDataset
from neuralfield_reg.transforms.grid_maps import GridMap, GridMapPair
from neuralfield_reg.gradicon.losses import gradient_inverse_consistency, inverse_consistency
from neuralfield_reg.losses import gradient_icon_autograd

SMALL = (8, 16, 32)


def affine_grid_displacement(matrix, offset, shape):
    """Displacement grid (1, d, *shape) of u(x) = M x + b: exact under linear interpolation."""
    grid = identity_grid(shape, dtype=torch.float64)
    u = grid @ torch.as_tensor(matrix, dtype=torch.float64).T + torch.as_tensor(offset, dtype=torch.float64)
    return u.movedim(-1, 0)[None]


def small_model(size=32, levels=2):
    torch.manual_seed(0)
    return gradicon.default_model(2, (size, size), levels=levels, widths=SMALL)


# -- networks -------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(32, 32), (33, 20), (12, 16, 10)])
def test_unet_keeps_grid_and_starts_at_zero(shape):
    net = gradicon.UNet(len(shape), widths=SMALL)
    out = net(torch.randn(3, 2, *shape))
    assert out.shape == (3, len(shape), *shape)
    assert float(out.detach().abs().max()) == 0.0          # zero head: a fresh network is the identity map


def test_fresh_model_is_identity_and_odd_sizes_work():
    model = gradicon.default_model(2, (30, 22), levels=3, widths=SMALL)
    images = torch.rand(2, 1, 30, 22)
    phi = model(images, images.flip(0))
    points = torch.rand(2, 7, 2)
    assert torch.allclose(phi(points), points)


def test_default_model_validates():
    with pytest.raises(ValueError, match="dim"):
        gradicon.default_model(4, (8, 8, 8, 8))
    with pytest.raises(ValueError, match="shape"):
        gradicon.default_model(2, (8, 8, 8))
    with pytest.raises(ValueError, match="levels"):
        gradicon.default_model(2, (8, 8), levels=4)


# -- maps -------------------------------------------------------------------------------------------
def test_grid_map_composition_matches_analytic_affine_maps():
    shape = (9, 11)
    m1, b1 = [[0.1, -0.05], [0.02, 0.08]], [0.03, -0.01]
    m2, b2 = [[-0.06, 0.04], [0.05, -0.02]], [-0.02, 0.02]
    first = GridMap([affine_grid_displacement(m1, b1, shape)])
    second = GridMap([affine_grid_displacement(m2, b2, (5, 7))])     # another resolution
    composed = second.compose(first)                                 # second o first
    x = torch.rand(1, 50, 2, dtype=torch.float64) * 0.6 + 0.2
    a1, a2 = torch.eye(2, dtype=torch.float64) + torch.tensor(m1), torch.eye(2, dtype=torch.float64) + torch.tensor(m2)
    y = x @ a1.T + torch.tensor(b1)
    expected = y @ a2.T + torch.tensor(b2)
    assert torch.allclose(composed(x), expected, atol=1e-12)


def test_grid_map_split_and_swap():
    grids = [torch.randn(4, 2, 5, 5), torch.randn(4, 2, 3, 3)]
    phi = GridMap(grids)
    halves = phi.split(2)
    assert len(halves) == 2 and torch.equal(halves[1].displacements[1], grids[1][2:])
    swapped = phi.swap_halves()
    assert torch.equal(swapped.displacements[0][:2], grids[0][2:])
    with pytest.raises(ValueError, match="displacements"):
        GridMap([torch.randn(1, 3, 5, 5)])


def test_downsample_keeps_the_unit_cube():
    """A coordinate ramp stays the same function of unit coordinates after halving (interior)."""
    ramp = identity_grid((33, 17), dtype=torch.float64).movedim(-1, 0)[None]     # (1, 2, 33, 17)
    half = gradicon.downsample(ramp)
    assert half.shape == (1, 2, 17, 9)
    expected = identity_grid((17, 9), dtype=torch.float64).movedim(-1, 0)[None]
    assert torch.allclose(half[..., 1:-1, 1:-1], expected[..., 1:-1, 1:-1], atol=1e-12)


# -- losses -----------------------------------------------------------------------------------------
def test_penalties_vanish_for_an_exact_inverse_pair():
    shift = torch.tensor([0.07, -0.04], dtype=torch.float64)
    forward = torch.ones(1, 2, 6, 6, dtype=torch.float64) * shift[None, :, None, None]
    phi = GridMap([torch.cat([forward, -forward])])          # [phi_AB; phi_BA]: translations by +t, -t
    points = torch.rand(2, 40, 2, dtype=torch.float64)
    assert float(inverse_consistency(phi, points)) < 1e-24
    assert float(gradient_inverse_consistency(phi, points)) < 1e-12


def test_gradicon_fd_matches_analytic_jacobian_and_the_autograd_penalty():
    shape = (17, 17)
    m_ab, m_ba = torch.tensor([[0.1, -0.05], [0.02, 0.08]]), torch.tensor([[-0.06, 0.04], [0.05, -0.12]])
    grids = [torch.cat([affine_grid_displacement(m_ab, [0.01, 0.0], shape),
                        affine_grid_displacement(m_ba, [0.0, -0.01], shape)])]
    phi = GridMap(grids)
    points = torch.rand(1, 64, 2, dtype=torch.float64) * 0.5 + 0.25
    points = torch.cat([points, points])
    eye = torch.eye(2, dtype=torch.float64)
    a, b = eye + m_ab.double(), eye + m_ba.double()
    jac_A, jac_B = a @ b - eye, b @ a - eye           # Jacobians of the two residuals
    expected = 0.5 * ((jac_A ** 2).sum() + (jac_B ** 2).sum()) / 2     # mean over axes of |J e_k|^2
    assert float(gradient_inverse_consistency(phi, points)) == pytest.approx(float(expected), rel=1e-6)
    pair = GridMapPair([grids[0][0]], [grids[0][1]])
    autograd = gradient_icon_autograd(pair.phi_AB, pair.phi_BA, points[0])
    assert float(gradient_inverse_consistency(phi, points)) == pytest.approx(float(autograd.detach()) / 2, rel=1e-6)


def test_registration_loss_terms():
    model = small_model()
    images = torch.rand(3, 1, 32, 32)
    same = gradicon.registration_loss(model, images, images, similarity="ssd")
    assert float(same["loss"].detach()) == pytest.approx(0.0, abs=1e-10)   # identity network, equal images
    different = gradicon.registration_loss(model, images, images.flip(0), similarity="lncc", loss="icon")
    assert float(different["similarity"].detach()) > 0.1 and float(different["inverse_consistency"].detach()) < 1e-12
    with pytest.raises(ValueError, match="loss"):
        gradicon.registration_loss(model, images, images, loss="ncc")
    with pytest.raises(ValueError, match="lam"):
        gradicon.registration_loss(model, images, images, lam=-1.0)
    with pytest.raises(ValueError, match="moving and fixed"):
        gradicon.registration_loss(model, images, images[:, :, :16])


def test_3d_model_trains_one_step():
    torch.manual_seed(0)
    model = gradicon.default_model(3, (12, 12, 12), levels=2, widths=SMALL)
    images = torch.rand(2, 1, 12, 12, 12)
    terms = gradicon.registration_loss(model, images, images.flip(0), similarity="lncc", lncc_window=3)
    terms["loss"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# -- training and register ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shapes32():
    return ShapePairDataset(64, 32, hollow=False, seed=3)      # solid shapes: quick to learn


def held_out_dice(model, pairs):
    scores = []
    for i in range(len(pairs)):
        result = gradicon.register(model, pairs.moving[i], pairs.fixed[i])
        scores.append(metrics.mean_dice(result.warp(pairs.moving_labels[i], mode="nearest"),
                                        pairs.fixed_labels[i]))
    return float(np.mean(scores))


def test_short_training_lowers_the_loss_and_raises_dice(shapes32):
    model = small_model()
    held_out = ShapePairDataset(12, 32, hollow=False, seed=4)
    before = held_out_dice(model, held_out)
    history = gradicon.train(model, shapes32, similarity="ssd", batch_size=16, lr=2e-3, steps=100,
                             progress=False)
    after = held_out_dice(model, held_out)
    assert np.mean(history["loss"][-20:]) < 0.5 * np.mean(history["loss"][:5])
    assert before < 0.55 and after > 0.75, (before, after)     # measured: 0.49 -> 0.84


def test_checkpoint_resume_takes_the_same_steps(shapes32, tmp_path):
    options = dict(similarity="ssd", batch_size=4, lr=1e-3, progress=False, seed=5)
    straight = small_model()
    gradicon.train(straight, shapes32, steps=4, **options)
    resumed = small_model()
    path = tmp_path / "train.ckpt"
    gradicon.train(resumed, shapes32, steps=2, checkpoint=path, **options)
    fresh = small_model()                          # a new process would start from scratch
    history = gradicon.train(fresh, shapes32, steps=4, checkpoint=path, **options)
    assert history["step"] == [1, 2, 3, 4]
    for a, b in zip(straight.parameters(), fresh.parameters()):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="other settings"):
        gradicon.train(small_model(), shapes32, steps=5, checkpoint=path, **{**options, "lr": 5e-4})


def test_train_rejects_bad_arguments(shapes32):
    model = small_model()
    with pytest.raises(ValueError, match="steps and time_budget_s"):
        gradicon.train(model, shapes32)
    with pytest.raises(ValueError, match="pairs"):
        gradicon.train(model, [], steps=1)
    with pytest.raises(ValueError, match="batch_size"):
        gradicon.train(model, shapes32, steps=1, batch_size=0)
    with pytest.raises(TypeError, match="network"):
        gradicon.train(torch.nn.Linear(2, 2), shapes32, steps=1)

    class BadPairs(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return torch.rand(32, 32), torch.full((32, 32), float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        gradicon.train(model, BadPairs(), steps=1, progress=False)


def test_train_reports_divergence(shapes32):
    model = small_model()
    with pytest.raises(FitDivergedError, match="step"):
        gradicon.train(model, shapes32, similarity="ssd", lr=1e6, batch_size=4, steps=30, progress=False)


def test_register_returns_a_registration_result(shapes32, tmp_path):
    model = small_model()
    gradicon.train(model, shapes32, similarity="ssd", batch_size=8, steps=10, progress=False)
    moving = shapes32.moving[0].numpy()
    fixed = np.kron(shapes32.fixed[0].numpy(), np.ones((2, 2), dtype=np.float32))[:63, :63]   # another grid
    result = gradicon.register(model, moving, fixed)
    assert isinstance(result, RegistrationResult) and result.metadata["method"] == "conv_network"
    assert result.warp(moving).shape == (63, 63) and result.warp_inverse(fixed).shape == (32, 32)
    det = result.jacobian_determinant()
    assert det.shape == (63, 63) and np.isfinite(det).all()
    points = torch.rand(20, 2)
    path = tmp_path / "pair.pt"
    result.save(path)
    loaded = RegistrationResult.load(path)
    assert torch.equal(loaded.phi_AB(points), result.phi_AB(points))
    assert loaded.config is None and loaded.metadata["method"] == "conv_network"


def test_register_matches_the_network_and_finetuning_leaves_it_alone(shapes32):
    model = small_model()
    gradicon.train(model, shapes32, similarity="ssd", batch_size=8, steps=10, progress=False)
    moving, fixed = shapes32.moving[1], shapes32.fixed[1]
    result = gradicon.register(model, moving, fixed)
    points = torch.rand(1, 30, 2)
    scaled = [(x - x.min()) / (x.max() - x.min()) for x in (moving, fixed)]   # register rescales to [0, 1]
    with torch.no_grad():
        expected = model(scaled[0][None, None], scaled[1][None, None])(points)[0]
    assert torch.allclose(result.phi_AB(points[0]), expected, atol=1e-6)
    snapshot = copy.deepcopy(model.state_dict())
    tuned = gradicon.register(model, moving, fixed, finetune_steps=5, similarity="ssd", lr=1e-3)
    assert len(tuned.history["loss"]) == 5
    assert all(torch.equal(snapshot[k], v) for k, v in model.state_dict().items())
    assert not torch.allclose(tuned.phi_AB(points[0]), result.phi_AB(points[0]))


def test_register_rejects_bad_inputs():
    model = small_model()
    with pytest.raises(ValueError, match="2D"):
        gradicon.register(model, np.random.rand(8, 8, 8), np.random.rand(8, 8, 8))
    with pytest.raises(ValueError, match="NaN"):
        gradicon.register(model, np.full((32, 32), np.nan), np.random.rand(32, 32))
    with pytest.raises(ValueError, match="finetune_steps"):
        gradicon.register(model, np.random.rand(32, 32), np.random.rand(32, 32), finetune_steps=-1)
    with pytest.raises(ValueError, match="constant"):
        gradicon.register(model, np.ones((32, 32)), np.random.rand(32, 32))
