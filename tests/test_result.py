"""RegistrationResult: warping, dense outputs and files, against analytic maps."""

import dataclasses
import json
import os

import numpy as np
import pytest
import torch

import neuralfield_reg as nfr
from neuralfield_reg import FitConfig, RegistrationResult
from neuralfield_reg.transforms.fields import MapPair


def affine_result(matrix, offset, shape=(20, 24), moving_shape=None, spacing=(1.0, 1.0)):
    """A result whose maps are an exact affine pair (fields at zero): phi_AB(x) = M x + b."""
    matrix = torch.as_tensor(matrix, dtype=torch.float32)
    offset = torch.as_tensor(offset, dtype=torch.float32)
    inverse = torch.linalg.inv(matrix)
    maps = MapPair(len(shape), affine_AB=(matrix, offset), affine_BA=(inverse, -inverse @ offset))
    return RegistrationResult(maps, moving_shape=moving_shape or shape, fixed_shape=shape,
                              moving_spacing=spacing, fixed_spacing=spacing, config=FitConfig(),
                              backend="torch", history={"loss": [1.0, 0.5]}, elapsed_s=1.5)


def test_warp_of_a_known_translation():
    shape = (20, 24)
    shift_voxels = np.array([3.0, -2.0])
    result = affine_result(np.eye(2), shift_voxels / (np.array(shape) - 1), shape)
    labels = np.zeros(shape, dtype=np.int16)
    labels[5:12, 6:15] = 7
    warped = result.warp(labels, mode="nearest")
    assert isinstance(warped, np.ndarray) and warped.dtype == np.int16
    # warped(i) = labels(i + shift): the box moves by -shift.
    expected = np.zeros(shape, dtype=np.int16)
    expected[2:9, 8:17] = 7
    np.testing.assert_array_equal(warped, expected)
    # A label at the moving image's edge: outside the scan there is no label (zeros), for label
    # maps by default; an intensity image keeps its edge value (border), unless asked otherwise.
    edge = np.zeros(shape, dtype=np.int16)
    edge[14:, :] = 3                                     # the last rows; the map reads rows up to 22
    inside = (np.arange(11, 20) < 17)[:, None] & (np.arange(shape[1]) >= 2)[None]   # reads rows 14..19, columns >= 0
    for mode in ("nearest", "label"):
        np.testing.assert_array_equal(result.warp(edge, mode=mode)[11:], np.where(inside, 3, 0))
    bright = result.warp(edge.astype(np.float32))
    assert (bright[17:, 2:] == 3).all()
    assert (result.warp(edge.astype(np.float32), padding="zeros")[17:] == 0).all()
    np.testing.assert_array_equal(result.warp(edge, mode="label", padding="border")[17:, 2:], 3)
    # Linear warp of a smooth image: f(x) -> f(x + t), exact for a ramp away from the border.
    i, j = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    ramp = (0.5 * i + 0.25 * j).astype(np.float32)
    warped_ramp = result.warp(ramp)
    np.testing.assert_allclose(warped_ramp[:15, 3:], (0.5 * (i + 3) + 0.25 * (j - 2))[:15, 3:], atol=1e-4)
    # The inverse warp undoes it inside the overlap.
    back = result.warp_inverse(warped_ramp)
    np.testing.assert_allclose(back[3:15, 3:20], ramp[3:15, 3:20], atol=1e-4)


def test_tensor_in_tensor_out_and_shape_check():
    result = affine_result(np.eye(2), [0.0, 0.0])
    image = torch.rand(20, 24)
    out = result.warp(image)
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out, image, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="moving image's shape"):
        result.warp(np.zeros((24, 20)))
    with pytest.raises(ValueError, match="NaN"):
        result.warp(np.full((20, 24), np.nan))
    with pytest.raises(ValueError, match="mode"):
        result.warp(image, mode="cubic")


def test_displacement_jacobian_and_inverse_consistency_of_an_affine():
    shape = (20, 24)
    matrix = np.array([[1.2, 0.0], [0.0, 0.75]])
    offset = np.array([0.05, -0.02])
    result = affine_result(matrix, offset, shape)
    displacement = result.displacement()
    assert displacement.shape == (2, *shape)
    i, j = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    expected_i = (1.2 * i / 19 + 0.05) * 19 - i
    np.testing.assert_allclose(displacement[0], expected_i, atol=1e-4)
    np.testing.assert_allclose(result.jacobian_determinant(), np.full(shape, 0.9), rtol=1e-5)
    np.testing.assert_allclose(result.jacobian_determinant("BA"), np.full(shape, 1 / 0.9), rtol=1e-5)
    assert result.inverse_consistency_error() < 1e-4


def test_inverse_consistency_error_in_voxels():
    shape = (11, 21)
    result = affine_result(np.eye(2), [0.0, 0.0], shape)
    # Break the inverse by half a voxel along axis 0 in phi_BA's offset.
    result.maps.offsets[1] += torch.tensor([0.5 / 10, 0.0])
    assert result.inverse_consistency_error() == pytest.approx(0.5, rel=1e-4)


def test_inverse_consistency_error_over_every_second_voxel():
    """``every=2``: the mean residual over the voxels with even indices, as map_points gives it
    (the residual grows across the image here, so the sample's mean is not the full mean)."""
    result = affine_result(np.array([[1.1, 0.1], [0.0, 0.9]]), [0.02, -0.03], (13, 16), moving_shape=(15, 12))
    result.maps.matrices[1] *= 1.02                                     # phi_BA a little off the inverse
    errors = []
    for shape, inner, outer in (((15, 12), "BA", "AB"), ((13, 16), "AB", "BA")):
        other = (13, 16) if inner == "BA" else (15, 12)
        i, j = np.meshgrid(np.arange(0, shape[0], 2), np.arange(0, shape[1], 2), indexing="ij")
        voxels = np.stack([i.ravel(), j.ravel()], 1).astype(np.float32)
        middle = result.map_points(voxels, inner)
        inside = ((middle >= 0) & (middle <= np.array(other) - 1)).all(1)
        back = result.map_points(middle[inside], outer)
        errors.append(np.linalg.norm(back - voxels[inside], axis=1).mean())
    assert result.inverse_consistency_error(every=2) == pytest.approx(np.mean(errors), rel=1e-4)
    assert result.inverse_consistency_error() != pytest.approx(np.mean(errors), rel=1e-3)
    with pytest.raises(ValueError, match="every"):
        result.inverse_consistency_error(every=0)


def test_jacobian_in_physical_units_with_different_grids():
    # Moving grid twice as fine along axis 0 with half the spacing: the same physical domain, so the
    # identity in unit coordinates is the identity in millimetres (det 1).
    maps = MapPair(2)
    result = RegistrationResult(maps, moving_shape=(39, 20), fixed_shape=(20, 20), moving_spacing=(0.5, 1.0),
                                fixed_spacing=(1.0, 1.0), config=FitConfig(), backend="torch")
    np.testing.assert_allclose(result.jacobian_determinant(), 1.0, rtol=1e-5)


def test_map_points_in_voxels():
    shape = (20, 24)
    result = affine_result(np.eye(2), [2.0 / 19, 0.0], shape)
    mapped = result.map_points(np.array([[1.0, 1.0], [10.0, 5.0]]))
    np.testing.assert_allclose(mapped, [[3.0, 1.0], [12.0, 5.0]], atol=1e-4)


def test_save_load_round_trip(tmp_path):
    result = affine_result(np.array([[1.1, 0.1], [0.0, 0.9]]), [0.02, 0.01])
    with torch.no_grad():
        for parameter in result.maps.parameters():
            parameter.normal_(0, 0.01)
    path = tmp_path / "pair.pt"
    result.save(path)
    points = torch.rand(100, 2)
    for backend in ("auto", "torch"):         # a checkpoint moves between backends
        loaded = RegistrationResult.load(path, backend=backend)
        with torch.no_grad():
            torch.testing.assert_close(loaded.phi_AB(points), result.phi_AB(points))
            torch.testing.assert_close(loaded.phi_BA(points), result.phi_BA(points))
        assert loaded.history == result.history and loaded.elapsed_s == result.elapsed_s
        assert loaded.config == result.config and loaded.fixed_shape == result.fixed_shape
    assert loaded.backend == "torch"


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "pair.pt"
    path.write_bytes(b"previous content")

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        affine_result(np.eye(2), [0.0, 0.0]).save(path)
    assert path.read_bytes() == b"previous content"
    assert os.listdir(tmp_path) == ["pair.pt"]


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        RegistrationResult.load(tmp_path / "missing.pt")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(ValueError, match="not a neuralfield_reg result"):
        RegistrationResult.load(foreign)
    good = tmp_path / "good.pt"
    affine_result(np.eye(2), [0.0, 0.0]).save(good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError, match="truncated or foreign"):
        RegistrationResult.load(truncated)
    state = torch.load(good, weights_only=True)
    state["format_version"] = 999
    future = tmp_path / "future.pt"
    torch.save(state, future)
    with pytest.raises(ValueError, match="has result format 999"):
        RegistrationResult.load(future)


def test_chunked_dense_outputs_equal_unchunked(monkeypatch):
    """A small volume with non-zero fields: every dense output is the same with 97-point chunks."""
    from neuralfield_reg.registration import result as result_module
    result = affine_result(np.array([[1.05, 0.02, 0.0], [0.0, 0.97, 0.03], [0.01, 0.0, 1.02]]),
                           [0.01, -0.02, 0.0], shape=(9, 10, 11), spacing=(1.0, 1.0, 1.0))
    with torch.no_grad():
        for parameter in result.maps.parameters():
            parameter.normal_(0, 0.01)
    image = np.random.default_rng(0).random((9, 10, 11)).astype(np.float32)
    outputs = lambda: (result.warp(image), result.displacement(), result.jacobian_determinant(),  # noqa: E731
                       result.inverse_consistency_error())
    whole = outputs()
    monkeypatch.setattr(result_module, "CHUNK_POINTS", 97)
    result._dense.clear()                       # dense maps are cached: compute them again
    chunked = outputs()
    for a, b in zip(whole[:3], chunked[:3]):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert chunked[3] == pytest.approx(whole[3], rel=1e-5)


def test_dense_outputs_are_cached_until_the_maps_change():
    """A pipeline's outputs evaluate each map once on its grid; a change of the parameters (in
    place, as load_state_dict does) is seen, and a returned det J can be modified freely."""
    result = affine_result(np.array([[1.05, 0.02], [0.0, 0.97]]), [0.01, -0.02], shape=(12, 14))
    with torch.no_grad():
        for parameter in result.maps.parameters():
            parameter.normal_(0, 0.01)
    image = np.random.default_rng(0).random((12, 14)).astype(np.float32)
    first = (result.warp(image), result.jacobian_determinant())
    first[1][:] = -1.0                          # the caller's copy, not the cache
    second = (result.warp(image), result.jacobian_determinant(), result.world_displacement("AB"))
    np.testing.assert_array_equal(first[0], second[0])
    assert (second[1] > 0).all()
    assert len(result._dense) == 2              # phi_AB on the fixed grid, det J of AB
    with torch.no_grad():
        for parameter in result.maps.parameters():
            parameter.add_(0.02)
    third = result.warp(image)
    assert np.abs(third - second[0]).max() > 1e-4
    result._dense.clear()
    np.testing.assert_allclose(result.warp(image), third, rtol=0, atol=0)


def test_a_result_saved_before_the_config_sections_still_loads(tmp_path):
    """tests/data/result_flat_config.pt.bin was saved by the code whose FitConfig was one flat
    dataclass (its config dict holds every setting by name): it loads, with the same settings,
    and warps as it did when it was saved."""
    import shutil
    from pathlib import Path
    data = Path(__file__).parent / "data"
    path = tmp_path / "old.pt"
    shutil.copy(data / "result_flat_config.pt.bin", path)
    result = RegistrationResult.load(path)
    expected = FitConfig(iterations=10, similarity_points=128, gradient_icon_points=32, affine=None,
                         hidden_widths=(32, 32), encoding=nfr.HashGridConfig.from_resolutions(4, 16, 3, log2_hashmap_size=8))
    assert result.config == expected and result.config.schedule.iterations == 10
    axis = np.linspace(0, 1, 20)
    grid = np.stack(np.meshgrid(axis, axis, indexing="ij"), -1)
    moving = (np.linalg.norm(grid - [0.45, 0.5], axis=-1) < 0.3).astype(np.float32)
    np.testing.assert_allclose(result.warp(moving), np.load(data / "result_flat_config_warped.npy"), atol=1e-6)


def test_config_sections_and_settings_by_name():
    config = FitConfig.preset("3d")
    assert config.iterations == config.schedule.iterations == 300
    assert config.foreground == config.sampling.foreground == "auto"
    changed = dataclasses.replace(config, iterations=7, similarity="ssd", affine=None)
    assert (changed.schedule.iterations, changed.objective.similarity, changed.affine) == (7, "ssd", None)
    assert changed.sampling == config.sampling and changed.model == config.model
    assert FitConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    flat = {"iterations": 3, "similarity": "ncc", "affine": {"iterations": 5}}          # a --config file
    assert FitConfig.from_dict(flat) == FitConfig(iterations=3, similarity="ncc", affine=nfr.AffineConfig(iterations=5))
    assert FitConfig.from_dict({"schedule": {"iterations": 4}}, base=config).schedule.iterations == 4
    with pytest.raises(TypeError, match="FitConfig.iterations"):
        FitConfig(iterations=2.5)
    with pytest.raises(TypeError, match="unknown settings"):
        FitConfig(colour="red")
    with pytest.raises(ValueError, match="unknown ScheduleConfig fields"):
        FitConfig.from_dict({"schedule": {"colour": 1}})
    with pytest.raises(AttributeError):
        config.colour
