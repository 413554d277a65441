"""fit_pair end to end, its input checks, determinism and divergence detection."""

import dataclasses

import numpy as np
import pytest
import torch

import neuralfield_reg as nfr
from neuralfield_reg.data import Shape
from neuralfield_reg.metrics import folding_fraction, mean_dice
from neuralfield_reg.encoders import HashGridConfig

QUICK = nfr.FitConfig(iterations=5, gradient_icon_points=64, similarity_points=256,
                      affine=nfr.AffineConfig(iterations=5))


@pytest.fixture(scope="module")
def pair64():
    moving, moving_labels = Shape("triangle", (0.52, 0.47), 0.3, 0.4).render(64)
    fixed, fixed_labels = Shape("circle", (0.5, 0.55), 0.27, 0.0).render(64)
    return moving, fixed, moving_labels, fixed_labels


def test_end_to_end_fit_raises_dice_without_folds(pair64):
    moving, fixed, moving_labels, fixed_labels = pair64
    config = dataclasses.replace(nfr.FitConfig(), iterations=150, blur_sigmas=(3.0, 1.5, 0.75, 0.0))
    result = nfr.fit_pair(moving, fixed, config, progress=False)
    before = mean_dice(moving_labels, fixed_labels)
    after = mean_dice(result.warp(moving_labels, mode="nearest"), fixed_labels)
    assert before < 0.8
    assert after > 0.93, (before, after)
    assert folding_fraction(result.jacobian_determinant()) < 1e-3
    assert result.inverse_consistency_error() < 0.5
    assert result.backend in ("native", "torch") and result.elapsed_s > 0
    assert len(result.history["loss"]) == 150
    assert ((result.warp(moving) - fixed) ** 2).mean() < 0.5 * ((moving - fixed) ** 2).mean()


def test_same_seed_gives_bit_identical_results(pair64):
    moving, fixed, _, _ = pair64
    first = nfr.fit_pair(moving, fixed, QUICK, progress=False, seed=3)
    second = nfr.fit_pair(moving, fixed, QUICK, progress=False, seed=3)
    assert first.history == second.history
    for a, b in zip(first.maps.state_dict().values(), second.maps.state_dict().values()):
        assert torch.equal(a, b)
    third = nfr.fit_pair(moving, fixed, QUICK, progress=False, seed=4)
    assert third.history != first.history


def test_torch_inputs_and_anisotropic_spacing(pair64):
    moving, fixed, _, _ = pair64
    result = nfr.fit_pair(torch.from_numpy(moving), torch.from_numpy(fixed[:, ::2].copy()), QUICK,
                          spacing=((1.0, 1.0), (1.0, 2.0)), progress=False)
    assert result.fixed_shape == (64, 32) and result.fixed_spacing == (1.0, 2.0)
    warped = result.warp(torch.from_numpy(moving))
    assert isinstance(warped, torch.Tensor) and warped.shape == (64, 32)


def test_absurd_learning_rate_is_reported_as_divergence(pair64):
    moving, fixed, _, _ = pair64
    config = dataclasses.replace(QUICK, learning_rate=1e12, iterations=20)
    with pytest.raises(nfr.FitDivergedError, match="iteration"):
        nfr.fit_pair(moving, fixed, config, progress=False)


def test_rollback_recovers_from_a_diverging_learning_rate(pair64):
    """lr 1e5 overflows within a few iterations; one rollback to the last good state (iteration 0)
    with the rate scaled to 1e-2 gives an ordinary fit."""
    moving, fixed, moving_labels, fixed_labels = pair64
    config = dataclasses.replace(nfr.FitConfig(), iterations=150, blur_sigmas=(3.0, 1.5, 0.75, 0.0),
                                 learning_rate=1e5, on_divergence="rollback", rollback_factor=1e-7)
    result = nfr.fit_pair(moving, fixed, config, progress=False)
    assert [r["iteration"] for r in result.metadata["rollbacks"]] == [0]
    assert len(result.history["loss"]) == 150 and np.isfinite(result.history["loss"]).all()
    assert mean_dice(result.warp(moving_labels, mode="nearest"), fixed_labels) > 0.93


def test_rollback_gives_up_after_max_rollbacks(pair64):
    moving, fixed, _, _ = pair64
    config = dataclasses.replace(QUICK, learning_rate=1e12, iterations=20, on_divergence="rollback",
                                 max_rollbacks=2)
    with pytest.raises(nfr.FitDivergedError, match="after 2 rollbacks"):
        nfr.fit_pair(moving, fixed, config, progress=False)


@pytest.mark.parametrize("moving,fixed,error,fragment", [
    (np.zeros((8, 8, 8)), np.zeros((8, 8)), ValueError, "same number of axes"),
    (np.zeros(8), np.zeros(8), ValueError, "2D or 3D"),
    (np.zeros((2, 3, 4, 5)), np.zeros((2, 3, 4, 5)), ValueError, "2D or 3D"),
    (np.zeros((0, 5)), np.zeros((5, 5)), ValueError, "empty"),
    (np.zeros((1, 8, 8)), np.zeros((1, 8, 8)), ValueError, "at least 2 voxels"),
    (np.full((8, 8), np.nan), np.ones((8, 8)), ValueError, "NaN"),
    (np.ones((8, 8)), np.full((8, 8), np.inf), ValueError, r"fixed: the image contains NaN or Inf values \(64 of 64 voxels\)"),
    (np.ones((8, 8), dtype=complex), np.ones((8, 8)), TypeError, "real-valued"),
    ([[1.0, 2.0], [3.0, 4.0]], np.ones((2, 2)), TypeError, "numpy array or a torch tensor"),
    (np.ones((8, 8)), np.ones((8, 8)), ValueError, "constant"),
])
def test_bad_inputs_raise_clear_errors(moving, fixed, error, fragment):
    with pytest.raises(error, match=fragment):
        nfr.fit_pair(moving, fixed, QUICK, progress=False)


def test_bad_options_raise_clear_errors(pair64):
    moving, fixed, _, _ = pair64
    with pytest.raises(TypeError, match="config"):
        nfr.fit_pair(moving, fixed, {"iterations": 3}, progress=False)
    with pytest.raises(ValueError, match="spacing"):
        nfr.fit_pair(moving, fixed, QUICK, spacing=(1.0, -1.0), progress=False)
    with pytest.raises(nfr.BackendUnavailableError, match="tinycudann"):
        nfr.fit_pair(moving, fixed, dataclasses.replace(QUICK, backend="tcnn"), progress=False)


@pytest.mark.parametrize("similarity", ["ncc", "lncc", "mi"])
def test_other_similarities_run(pair64, similarity):
    moving, fixed, _, _ = pair64
    result = nfr.fit_pair(moving, fixed, dataclasses.replace(QUICK, similarity=similarity), progress=False)
    assert np.isfinite(result.history["similarity"]).all()


def test_mutual_information_registers_an_inverted_contrast(pair64):
    """MI needs no linear relation between the intensities: the fixed image with its contrast
    inverted is registered as well as the original, where NCC (which wants a positive
    correlation) fails."""
    moving, fixed, moving_labels, fixed_labels = pair64
    config = nfr.FitConfig(iterations=200, affine=None, similarity="mi", gradient_icon_weight=3.5)
    dice = {}
    for name, image in (("original", fixed), ("inverted", 1.0 - fixed)):
        result = nfr.fit_pair(moving, image, config, progress=False)
        dice[name] = mean_dice(result.warp(moving_labels, mode="nearest"), fixed_labels)
        assert folding_fraction(result.jacobian_determinant()) == 0.0
    assert mean_dice(moving_labels, fixed_labels) < 0.7 and dice["inverted"] > 0.95
    assert abs(dice["inverted"] - dice["original"]) < 0.01
    ncc = nfr.fit_pair(moving, 1.0 - fixed, dataclasses.replace(config, similarity="ncc", gradient_icon_weight=0.5),
                       progress=False)
    assert mean_dice(ncc.warp(moving_labels, mode="nearest"), fixed_labels) < 0.5


def test_clipped_percentiles_keep_mutual_information_from_a_few_hot_voxels(pair64):
    """Five voxels at 50 times the maximum squash the shape into MI's lowest bin, and the fit
    fails; clipped to the 0.5-99.5 percentiles (the 3D preset's) it registers."""
    moving, fixed, moving_labels, fixed_labels = pair64
    hot = moving.copy()
    hot[[3, 60, 10, 50, 30], [5, 7, 60, 55, 2]] = 50.0
    config = nfr.FitConfig(iterations=200, affine=None, similarity="mi", gradient_icon_weight=3.5)
    dice = {}
    for clip in (None, (0.5, 99.5)):
        result = nfr.fit_pair(hot, fixed, dataclasses.replace(config, clip_percentiles=clip), progress=False)
        dice[clip] = mean_dice(result.warp(moving_labels, mode="nearest"), fixed_labels)
    assert dice[None] < 0.5 and dice[(0.5, 99.5)] > 0.95
    assert nfr.FitConfig.preset("3d").clip_percentiles == (0.5, 99.5)


def test_integer_images_are_accepted(pair64):
    moving, fixed, _, _ = pair64
    result = nfr.fit_pair((moving * 255).astype(np.uint8), (fixed * 255).astype(np.uint8), QUICK, progress=False)
    assert result.fixed_shape == (64, 64)


@pytest.mark.parametrize("field,value", [("iterations", 0), ("learning_rate", -1.0), ("gradient_icon_weight", -0.1),
                                         ("diffusion_weight", float("nan")), ("diffusion_weight", -1.0),
                                         ("similarity", "mutual"), ("mi_bins", 3), ("blur_sigmas", ()), ("backend", "gpu"),
                                         ("similarity_points", 0), ("lncc_window", 4),
                                         ("learning_rate_decay", 0.0), ("on_divergence", "ignore"),
                                         ("rollback_factor", 1.0), ("max_rollbacks", -1),
                                         ("lncc_patches", 0), ("lncc_patch_size", 1)])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        nfr.FitConfig(**{field: value})


def test_config_round_trips_through_plain_values():
    config = nfr.FitConfig(encoding=nfr.HashGridConfig(n_levels=4), blur_sigmas=(2.0, 0.0))
    assert nfr.FitConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown"):
        nfr.FitConfig.from_dict({"iterations": 3, "colour": "red"})


@pytest.mark.cuda
def test_fit_on_cuda(pair64):
    moving, fixed, moving_labels, fixed_labels = pair64
    config = dataclasses.replace(nfr.FitConfig(), iterations=150, blur_sigmas=(3.0, 1.5, 0.75, 0.0))
    result = nfr.fit_pair(moving, fixed, config, device="cuda", progress=False)
    assert result.device.type == "cuda"
    warped = result.warp(moving_labels, mode="nearest")
    assert isinstance(warped, np.ndarray)
    assert mean_dice(warped, fixed_labels) > 0.93
    assert folding_fraction(result.jacobian_determinant()) < 1e-3


def test_fit_pairs_matches_fitting_one_by_one():
    """Three pairs in one batched fit against three single fits (same initialisation seeds,
    other random points): Dice within 0.02 of each other and above 0.9; the batched call with one
    pair is fit_pair exactly."""
    from neuralfield_reg.data import shape_pairs
    pairs = shape_pairs(3, 48, hollow=False, seed=11)
    config = dataclasses.replace(nfr.FitConfig(), iterations=80, blur_sigmas=(2.0, 1.0, 0.0),
                                 affine=nfr.AffineConfig(iterations=20))
    batched = nfr.fit_pairs([p.moving for p in pairs], [p.fixed for p in pairs], config, seed=5, progress=False)
    assert [r.metadata["pair_index"] for r in batched] == [0, 1, 2]
    for p, (pair, result) in enumerate(zip(pairs, batched)):
        single = nfr.fit_pair(pair.moving, pair.fixed, config, seed=5 + p, progress=False)
        dice_batched = mean_dice(result.warp(pair.moving_labels, mode="nearest"), pair.fixed_labels)
        dice_single = mean_dice(single.warp(pair.moving_labels, mode="nearest"), pair.fixed_labels)
        assert dice_batched > 0.9 and abs(dice_batched - dice_single) < 0.02, (p, dice_batched, dice_single)
        assert len(result.history["loss"]) == 80
    one = nfr.fit_pairs([pairs[0].moving], [pairs[0].fixed], config, seed=5, progress=False)[0]
    alone = nfr.fit_pair(pairs[0].moving, pairs[0].fixed, config, seed=5, progress=False)
    assert one.history == alone.history


def test_fit_pairs_rejects_bad_batches(pair64):
    moving, fixed, _, _ = pair64
    with pytest.raises(TypeError, match="movings: expected a list"):
        nfr.fit_pairs(moving, fixed, QUICK, progress=False)
    with pytest.raises(ValueError, match="equal length"):
        nfr.fit_pairs([moving, moving], [fixed], QUICK, progress=False)
    with pytest.raises(ValueError, match="same shape"):
        nfr.fit_pairs([moving, moving[:40]], [fixed, fixed], QUICK, progress=False)
    with pytest.raises(ValueError, match=r"fixeds\[1\]: the image contains NaN"):
        nfr.fit_pairs([moving, moving], [fixed, np.full_like(fixed, np.nan)], QUICK, progress=False)


def test_masks_restrict_the_similarity(pair64):
    """Identical images except a blob in the fixed one: at the first iteration (identity maps)
    the similarity is exactly 0 when the fixed mask leaves the blob out, and positive without."""
    moving, _, _, _ = pair64
    fixed = moving.copy()
    fixed[5:15, 5:15] += 1.0
    fixed_mask = np.ones(fixed.shape, dtype=bool)
    fixed_mask[:20, :20] = False
    moving_mask = np.ones(moving.shape, dtype=bool)
    moving_mask[:20, :20] = False
    config = dataclasses.replace(QUICK, affine=None, iterations=1, blur_sigmas=(0.0,))
    for similarity in ("ssd", "ncc"):
        options = dataclasses.replace(config, similarity=similarity)
        masked = nfr.fit_pair(moving, fixed, options, moving_mask=moving_mask, fixed_mask=fixed_mask, progress=False)
        plain = nfr.fit_pair(moving, fixed, options, progress=False)
        assert masked.history["similarity"][0] == pytest.approx(0.0, abs=2e-5), similarity   # float32
        assert plain.history["similarity"][0] > 1e-3, similarity
    # LNCC is not 0 for equal images (flat neighbourhoods correlate 0); masked it averages fewer voxels.
    options = dataclasses.replace(config, similarity="lncc")
    masked = nfr.fit_pair(moving, fixed, options, moving_mask=moving_mask, fixed_mask=fixed_mask, progress=False)
    plain = nfr.fit_pair(moving, fixed, options, progress=False)
    assert masked.history["similarity"][0] != pytest.approx(plain.history["similarity"][0], abs=1e-4)
    with pytest.raises(ValueError, match=r"fixed_mask: expected the fixed image's shape \(64, 64\)"):
        nfr.fit_pair(moving, fixed, config, fixed_mask=fixed_mask[:10], progress=False)
    with pytest.raises(ValueError, match="moving_mask: the mask is empty"):
        nfr.fit_pair(moving, fixed, config, moving_mask=np.zeros_like(moving_mask), progress=False)


def test_percentile_clipping_ignores_outliers():
    from neuralfield_reg.registration.fit import normalize_intensity
    image = torch.linspace(0.0, 1.0, 10_000).reshape(100, 100)
    image[0, 0] = 1e6                                     # one hot voxel
    plain = normalize_intensity("image", image)
    clipped = normalize_intensity("image", image, (1.0, 99.0))
    assert float(plain.median()) < 1e-5                   # everything squashed towards 0
    assert float(clipped.median()) == pytest.approx(0.5, abs=0.01)
    assert float(clipped.min()) == 0.0 and float(clipped.max()) == 1.0
    small = torch.zeros(100, 100)
    small[:3, :3] = 1.0                                   # an object in 0.09 % of the voxels
    torch.testing.assert_close(normalize_intensity("image", small, (0.5, 99.5)), small)   # not clipped away
    with pytest.raises(ValueError, match="constant"):
        normalize_intensity("image", torch.ones(10, 10), (0.5, 99.5))
    with pytest.raises(ValueError, match="clip_percentiles"):
        nfr.FitConfig(clip_percentiles=(99.0, 1.0))
    config = nfr.FitConfig(clip_percentiles=(1.0, 99.0))
    assert nfr.FitConfig.from_dict(config.to_dict()) == config


def test_patch_indices_are_whole_cubes_inside_the_grid():
    from neuralfield_reg.engine.sampler import patch_indices
    shape = (7, 20, 9)
    index = patch_indices(shape, 2, 5, 4, torch.Generator().manual_seed(0))
    assert index.shape == (2, 5 * 4 * 4 * 4)
    voxels = np.stack(np.unravel_index(index.numpy().reshape(2, 5, 64), shape), axis=-1)    # (B, P, 64, 3)
    for patch in voxels.reshape(-1, 64, 3):
        corner = patch.min(0)
        assert (patch.max(0) - corner == 3).all()
        expected = corner + np.stack(np.meshgrid(*[np.arange(4)] * 3, indexing="ij"), -1).reshape(-1, 3)
        np.testing.assert_array_equal(patch, expected)            # a whole cube, in C order
    # Patches around given centres contain them, also at the border.
    centres = torch.tensor([[0, 7 * 20 * 9 - 1, 3 * 20 * 9 + 10 * 9 + 4]])
    around = patch_indices(shape, 1, 3, 4, torch.Generator().manual_seed(0), centres).reshape(3, 64)
    for patch, centre in zip(around, centres[0]):
        assert centre in patch
    # An axis shorter than the patch is taken whole.
    short = patch_indices((3, 30), 1, 2, 8, torch.Generator().manual_seed(1))
    rows = np.unravel_index(short.numpy().reshape(2, 24), (3, 30))[0]
    assert (np.sort(np.unique(rows)) == [0, 1, 2]).all()


def test_lncc_on_patches_registers_a_volume():
    moving = np.zeros((24, 24, 24), np.float32)
    fixed = np.zeros_like(moving)
    moving[6:15, 7:16, 8:17] = 1.0
    fixed[9:18, 9:18, 8:17] = 1.0
    config = nfr.FitConfig(iterations=120, similarity="lncc", lncc_window=5, lncc_patches=8, lncc_patch_size=10,
                           blur_sigmas=(2.0, 1.0, 0.0), affine=None, gradient_icon_points=256)
    result = nfr.fit_pair(moving, fixed, config, progress=False)
    before = mean_dice(moving > 0.5, fixed > 0.5)
    after = mean_dice(result.warp(moving) > 0.5, fixed > 0.5)
    assert before < 0.6 and after > 0.85, (before, after)
    assert len(result.history["similarity"]) == 120


def test_masked_points_are_drawn_from_the_mask_voxels():
    from neuralfield_reg.engine.sampler import padded_nonzero as _padded_nonzero
    masks = torch.zeros(2, 10, dtype=torch.bool)
    masks[0, [2, 5, 7]] = True
    masks[1, [0, 9]] = True
    voxels, counts = _padded_nonzero(masks)
    assert counts.tolist() == [3, 2]
    assert voxels[0].tolist() == [2, 5, 7] and voxels[1, :2].tolist() == [0, 9]
    assert voxels[1, 2].item() in (0, 9)             # padding repeats a mask voxel
    masks = torch.rand(3, 5000, generator=torch.Generator().manual_seed(0)) < torch.tensor([[0.1], [0.5], [0.9]])
    voxels, counts = _padded_nonzero(masks)
    for row, mask in enumerate(masks):
        expected = torch.nonzero(mask)[:, 0]
        assert counts[row] == len(expected) and torch.equal(voxels[row, :len(expected)], expected)
        assert bool(mask[voxels[row]].all())


def test_the_preset_follows_the_dimensionality_and_overrides_apply():
    flat = nfr.fit_pair(np.random.default_rng(0).random((16, 16)).astype(np.float32),
                        np.random.default_rng(1).random((16, 16)).astype(np.float32),
                        dataclasses.replace(nfr.FitConfig(), iterations=2), progress=False)
    assert flat.config.similarity == nfr.FitConfig().similarity
    volume = np.zeros((12, 12, 12), np.float32)
    volume[3:9, 3:9, 3:9] = 1.0
    preset = nfr.FitConfig.preset("3d")
    assert preset.similarity == "mi" and preset.foreground == "auto" and nfr.FitConfig.preset("2d") == nfr.FitConfig()
    assert preset.average_last == 0.5 and preset.similarity_fraction == 1 / 128
    with pytest.raises(ValueError, match="name"):
        nfr.FitConfig.preset("4d")
    quick = nfr.FitConfig.from_dict({"iterations": 3, "affine": None}, base=preset)
    assert quick.iterations == 3 and quick.similarity == "mi" and quick.affine is None
    result = nfr.fit_pair(volume, np.roll(volume, 1, 0), quick, progress=False)
    assert result.config.encoding is not None and result.config.foreground == "auto"
    # the finest level's cells are finest_cell_voxels wide (at least 8 cells), the same number of
    # cells over a 2 mm and a 1 mm scan of one field of view when the preset doubles nothing else
    from neuralfield_reg.config import default_encoding
    for shape, cells in (((91, 109, 91), 31), ((181, 217, 181), 62), ((12, 12, 12), 8)):
        encoding = default_encoding(shape, 3.5)
        finest = encoding.base_resolution * encoding.per_level_scale ** (encoding.n_levels - 1)
        assert round(finest) == cells
    levels = {"n_levels": preset.n_levels, "base_resolution": preset.base_resolution,
              "n_features_per_level": preset.n_features_per_level}
    assert result.config.encoding == default_encoding((12, 12, 12), preset.finest_cell_voxels, **levels)
    # the 3D preset's grid: 6 levels of 4 features from 8 cells to cells of 2.5 voxels
    encoding = nfr.FitConfig.preset("3d").resolved((91, 109, 91)).encoding
    finest = encoding.base_resolution * encoding.per_level_scale ** (encoding.n_levels - 1)
    assert (encoding.n_levels, encoding.n_features_per_level, encoding.base_resolution, round(finest)) == (6, 4, 8, 43)
    # the level settings reach the encoding; a given encoding overrides them; bad values are named
    config = nfr.FitConfig(n_levels=3, base_resolution=2, n_features_per_level=1).resolved((32, 32))
    assert (config.encoding.n_levels, config.encoding.base_resolution, config.encoding.n_features_per_level) == (3, 2, 1)
    given = HashGridConfig(n_levels=2)
    assert nfr.FitConfig(encoding=given, n_levels=5).resolved((32, 32)).encoding == given
    with pytest.raises(ValueError, match="FitConfig.n_features_per_level"):
        nfr.FitConfig(n_features_per_level=3)


def test_blur_in_mm_blurs_by_sigma_over_the_spacing():
    config = nfr.FitConfig(blur_sigmas=(4.0, 0.0), blur_in_mm=True)
    assert config.blur_voxels(4.0, (2.0, 1.0, 4.0)) == (2.0, 4.0, 1.0)
    assert nfr.FitConfig(blur_sigmas=(4.0, 0.0)).blur_voxels(4.0, (2.0, 1.0)) == (4.0, 4.0)
    with pytest.raises(TypeError, match="blur_in_mm"):
        nfr.FitConfig(blur_in_mm="yes")


def test_fit_without_a_config_takes_the_3d_preset_for_volumes(monkeypatch):
    import neuralfield_reg.registration.fit as fit_module
    volume = np.zeros((12, 12, 12), np.float32)
    volume[3:9, 3:9, 3:9] = 1.0
    seen = {}
    original = fit_module.FitConfig.for_images

    def short(dim, scans=False):
        seen["dim"] = dim
        return dataclasses.replace(original(dim, scans), iterations=2)
    monkeypatch.setattr(fit_module.FitConfig, "for_images", staticmethod(short))
    result = nfr.fit_pair(volume, np.roll(volume, 1, 0), progress=False)
    assert seen["dim"] == 3 and result.config.similarity == "mi" and result.config.iterations == 2


def test_2d_images_with_a_header_take_the_scan_preset(monkeypatch):
    import neuralfield_reg.registration.fit as fit_module
    from neuralfield_reg.geometry import Grid, Image
    image = np.zeros((16, 16), np.float32)
    image[4:12, 5:11] = 1.0
    seen = []
    original = fit_module.FitConfig.for_images

    def short(dim, scans=False):
        seen.append((dim, scans))
        return dataclasses.replace(original(dim, scans), iterations=2, affine=None)
    monkeypatch.setattr(fit_module.FitConfig, "for_images", staticmethod(short))
    grid = Grid.from_spacing((16, 16), 1.5)
    scan = nfr.fit_pair(Image(image, grid), Image(np.roll(image, 1, 0), grid), progress=False)
    bare = nfr.fit_pair(image, np.roll(image, 1, 0), progress=False)
    assert seen == [(2, True), (2, False)]
    assert scan.config.similarity == "mi" and scan.config.foreground == "auto" and bare.config.similarity == "ssd"
    assert original(2, True) == nfr.FitConfig.preset("2d-scan") and original(3, True) == nfr.FitConfig.preset("3d")


def test_the_scan_preset_registers_a_brain_slice_of_inverted_contrast():
    """An axial slice of the packaged Colin27 -> MNI152 pair, the fixed slice's contrast inverted
    inside the head (as between T1 and T2): SSD (the shape preset) can only drive the labels
    apart; mutual information registers it."""
    from neuralfield_reg.data.brain import load_brain_pair
    from neuralfield_reg.geometry import Grid, Image
    from neuralfield_reg import metrics
    pair = load_brain_pair()
    affine = np.eye(4)
    affine[:2, :2], affine[:2, 3] = pair.affine[:2, :2], pair.affine[:2, 3]
    grid = Grid((91, 109), affine)
    fixed = pair.fixed[:, :, 45]
    inverted = np.where(fixed > 0.05, 1.1 * fixed.max() - fixed, 0.0).astype(np.float32)
    moving_labels, fixed_labels = pair.moving_labels[:, :, 45], pair.fixed_labels[:, :, 45]
    labels = [int(v) for v in np.unique(fixed_labels) if v]

    def dice(warped):
        return float(np.mean(list(metrics.dice(np.asarray(warped), fixed_labels, labels).values())))
    scores = {}
    for name in ("2d", "2d-scan"):
        config = dataclasses.replace(nfr.FitConfig.preset(name), iterations=150)
        result = nfr.fit_pair(Image(pair.moving[:, :, 45], grid), Image(inverted, grid), config, progress=False)
        scores[name] = dice(result.warp(Image(moving_labels, grid), mode="label").data)
    start = dice(moving_labels)                          # the slices share a grid: 0.756
    assert scores["2d-scan"] > start + 0.02 and scores["2d"] < start - 0.2, (start, scores)


def test_foreground_mask_is_the_object_with_a_margin():
    from neuralfield_reg.registration.fit import foreground_mask
    image = torch.zeros(20, 20, 20)
    image[8:12, 8:12, 8:12] = 1.0
    mask = foreground_mask(image)
    assert mask[10, 10, 10] and mask[6, 10, 10] and not mask[2, 10, 10] and not mask[10, 10, 17]
    assert foreground_mask(torch.full((20, 20), 0.01)).all()          # nothing stands out: all of it
    # the dilation is the box of 5 voxels around every voxel above the threshold (after the blur)
    import torch.nn.functional as F
    from neuralfield_reg.geometry.filters import gaussian_blur
    generator = torch.Generator().manual_seed(0)
    for shape in ((23, 17, 30), (31, 26)):
        image = (torch.rand(shape, generator=generator) > 0.995).float()
        above = (gaussian_blur(image, 1.0) > 0.05).float()[None, None]
        pool = F.max_pool3d if len(shape) == 3 else F.max_pool2d
        expected = pool(above, 5, stride=1, padding=2)[0, 0] > 0
        assert 0.05 < expected.float().mean() < 0.95
        assert torch.equal(foreground_mask(image), expected)


def test_foreground_mask_leaves_out_a_noisy_background():
    """The air around a head in a raw MR scan is noise (Rician, here 6 % of the range), whose mean
    lies above the dark-background threshold: the mask is still the object with its margin, as
    for the same object on a clean background. An object filling the box, or a bright background,
    keeps the whole image (as before)."""
    from neuralfield_reg.registration.fit import foreground_mask
    generator = torch.Generator().manual_seed(1)
    axes = torch.meshgrid(*[torch.arange(40.0)] * 3, indexing="ij")
    radius = sum((a - 19.5) ** 2 for a in axes).sqrt()
    clean = torch.where(radius < 12, 0.6, 0.0)
    clean[radius < 4] = 0.15                                   # a dark structure inside (CSF-like)
    noise = [0.06 * torch.randn(clean.shape, generator=generator) for _ in range(2)]
    noisy = ((clean + noise[0]) ** 2 + noise[1] ** 2).sqrt()
    noisy = noisy / noisy.max()
    expected = foreground_mask(clean)
    mask = foreground_mask(noisy)
    assert bool(mask[radius < 12].all())                       # the whole object, its dark inside too
    assert float(mask[radius > 16].float().mean()) < 0.01      # and not the air
    overlap = (mask & expected).sum() / (mask | expected).sum()
    assert overlap > 0.9, (float(overlap), int(mask.sum()), int(expected.sum()))
    assert float(mask[radius > 16].float().mean()) < float((noisy > 0.05)[radius > 16].float().mean()) - 0.5
    textured = 0.5 + 0.3 * torch.rand(30, 30, 30, generator=generator)   # tissue up to every face
    assert foreground_mask(textured).all()
    bright = torch.where(radius < 12, 0.1, 0.9)                # a dark object on a bright background
    assert foreground_mask(bright).all()


def test_hidden_layers_start_with_zero_biases():
    from neuralfield_reg.transforms.fields import DisplacementFields
    fields = DisplacementFields(3, 2, nfr.HashGridConfig(), (32, 32), backend="torch")
    for bias in fields.biases:
        assert torch.count_nonzero(bias) == 0
    assert torch.count_nonzero(fields.weights[0]) > 0 and torch.count_nonzero(fields.weights[-1]) == 0


def test_similarity_fraction_sets_the_points_per_step():
    """``similarity_fraction`` of the largest compared voxel count (mask or grid) when that is more
    than ``similarity_points``; one count for both directions, drawn inside the masks."""
    from neuralfield_reg.engine.sampler import Sampler
    shapes = {"A": (10, 12, 14), "B": (9, 9, 9)}
    masks = {"A": torch.zeros(1, *shapes["A"], dtype=torch.bool), "B": None}
    masks["A"][0, 2:8, 3:9, 1:11] = True                                  # 360 voxels; B's grid has 729
    generator = torch.Generator().manual_seed(0)
    for fraction, points, expected in ((0.0, 50, 50), (0.1, 50, 73), (0.1, 100, 100), (0.5, 50, 365)):
        config = nfr.FitConfig(similarity="mi", similarity_points=points, similarity_fraction=fraction)
        sampler = Sampler(config, shapes, masks, 1, generator)
        draw = sampler.draw()
        assert sampler.count("A") == sampler.count("B") == expected, (fraction, points)
        assert draw.A.index.shape == draw.B.index.shape == (1, expected)
        assert bool(masks["A"].reshape(-1)[draw.A.index[0]].all())
    # a count above a grid's voxels compares that whole grid
    sampler = Sampler(nfr.FitConfig(similarity_points=50, similarity_fraction=1.0), shapes, masks, 1, generator)
    assert sampler.count("B") == 729 and sampler.draw().B.index is None
    with pytest.raises(ValueError, match="FitConfig.similarity_fraction"):
        nfr.FitConfig(similarity_fraction=1.5)


def test_weight_averaging_returns_the_mean_of_the_last_steps(pair64, monkeypatch):
    """With ``average_last`` the fitted parameters are the mean of the values after each of the last
    steps (recorded here from the optimiser), not the last step's."""
    import neuralfield_reg.registration.fit as fit_module
    moving, fixed, _, _ = pair64
    after_steps = []
    original = fit_module.make_adam

    def recording_adam(parameters, learning_rate, kernels=None, **options):
        optimizer = original(parameters, learning_rate, kernels, **options)
        step = optimizer.step

        def step_and_record():
            step()
            after_steps.append([p.detach().clone() for p in parameters])
        optimizer.step = step_and_record
        return optimizer
    monkeypatch.setattr(fit_module, "make_adam", recording_adam)
    config = dataclasses.replace(QUICK, iterations=8, average_last=0.5)
    result = nfr.fit_pair(moving, fixed, config, progress=False)
    assert len(after_steps) == 8
    fitted = list(result.maps.parameters())
    for k, parameter in enumerate(fitted):
        mean = torch.stack([values[k] for values in after_steps[4:]]).mean(0)
        torch.testing.assert_close(parameter.detach(), mean, rtol=1e-5, atol=1e-7)
    assert not torch.equal(fitted[0].detach(), after_steps[-1][0])
    with pytest.raises(ValueError, match="FitConfig.average_last"):
        nfr.FitConfig(average_last=1.0)


def test_weight_average_restarts_after_a_rollback():
    from neuralfield_reg.engine.loop import WeightAverage
    parameter = torch.zeros(3)
    average = WeightAverage([parameter], start=2)
    for step, value in enumerate([1.0, 2.0, 3.0, 5.0], start=1):
        parameter.fill_(value)
        average.add(step)                          # steps 3 and 4 count: mean 4
    assert average.count == 2
    average.reset()                                # rolled back to step 3: steps 4 and 5 count
    for step, value in ((4, 7.0), (5, 9.0)):
        parameter.fill_(value)
        average.add(step)
    average.apply()
    assert parameter.tolist() == [8.0, 8.0, 8.0]


def test_sparse_adam_is_handed_to_the_field_stage(pair64, monkeypatch):
    """``sparse_adam`` (the default) gives the field stage's Adam ``skip_zero`` (tested against
    torch's SparseAdam in test_optim.py). The first update is the same either way (entries without a
    gradient have no moments yet); later ones differ, once an entry with moments gets no gradient."""
    import neuralfield_reg.registration.fit as fit_module
    made = []
    original = fit_module.make_adam

    def recording_adam(parameters, learning_rate, kernels=None, **options):
        made.append(options.get("skip_zero"))
        return original(parameters, learning_rate, kernels, **options)
    monkeypatch.setattr(fit_module, "make_adam", recording_adam)
    moving, fixed, _, _ = pair64
    config = dataclasses.replace(QUICK, affine=None, iterations=6)
    sparse = nfr.fit_pair(moving, fixed, config, progress=False)
    dense = nfr.fit_pair(moving, fixed, dataclasses.replace(config, sparse_adam=False), progress=False)
    assert made == [True, False]
    assert sparse.history["loss"][:2] == dense.history["loss"][:2]
    assert sparse.history["loss"][2:] != dense.history["loss"][2:]
    with pytest.raises(TypeError, match="FitConfig.sparse_adam"):
        nfr.FitConfig(sparse_adam="yes")
