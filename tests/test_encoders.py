"""Hash-grid encoder: values against a brute-force reference, vertices, derivatives."""

import itertools
import math
import warnings

import pytest
import torch

from neuralfield_reg.encoders import (BackendUnavailableError, HashGridConfig, grid_layout, make_encoding,
                                      resolve_backend)

PRIMES = (1, 2654435761, 805459861)


def reference_encode(points, params, dim, config):
    """Point by point, level by level, corner by corner, in Python integers (no overflow)."""
    layout = grid_layout(dim, config)
    out = torch.zeros(points.shape[0], config.n_output_dims, dtype=torch.float64)
    for n, point in enumerate(points.tolist()):
        for level in range(config.n_levels):
            scale, resolution = layout.scales[level], layout.resolutions[level]
            size, offset = layout.table_sizes[level], layout.offsets[level]
            position = [p * scale + 0.5 for p in point]
            cell = [math.floor(p) for p in position]
            frac = [p - c for p, c in zip(position, cell)]
            if config.interpolation == "Smoothstep":
                frac = [f * f * (3 - 2 * f) for f in frac]
            for corner in itertools.product((0, 1), repeat=dim):
                vertex = [(c + b) % 2 ** 32 for c, b in zip(cell, corner)]
                if resolution ** dim <= size:
                    index = sum(v * resolution ** k for k, v in enumerate(vertex)) % 2 ** 32
                else:
                    index = 0
                    for k, v in enumerate(vertex):
                        index ^= (v * PRIMES[k]) % 2 ** 32
                weight = math.prod(f if b else 1 - f for f, b in zip(frac, corner))
                row = offset + index % size
                for f in range(config.n_features_per_level):
                    out[n, level * config.n_features_per_level + f] += weight * float(params[row, f])
    return out


CONFIGS = [
    (2, HashGridConfig(n_levels=4, log2_hashmap_size=6, base_resolution=3, per_level_scale=1.9)),
    (3, HashGridConfig(n_levels=3, log2_hashmap_size=7, base_resolution=3, per_level_scale=2.0)),
    (2, HashGridConfig(n_levels=3, n_features_per_level=4, log2_hashmap_size=5, base_resolution=4,
                       per_level_scale=1.5, interpolation="Smoothstep")),
    (3, HashGridConfig(n_levels=2, n_features_per_level=1, log2_hashmap_size=6, base_resolution=4,
                       per_level_scale=1.7, interpolation="Smoothstep")),
]


def _encoding(dim, config, dtype=torch.float64):
    encoding = make_encoding(dim, config, backend="torch").to(dtype)
    with torch.no_grad():
        encoding.params.normal_()
    return encoding


def test_layout_matches_tcnn_formulas():
    layout = grid_layout(3, HashGridConfig(n_levels=4, log2_hashmap_size=12, base_resolution=16,
                                            per_level_scale=2.0))
    assert layout.scales == (15.0, 31.0, 63.0, 127.0)
    assert layout.resolutions == (16, 32, 64, 128)
    assert layout.table_sizes == (4096, 4096, 4096, 4096)
    assert layout.hashed == (False, True, True, True)
    assert layout.offsets == (0, 4096, 8192, 12288)
    small = grid_layout(2, HashGridConfig(n_levels=2, log2_hashmap_size=10, base_resolution=3,
                                          per_level_scale=1.5))
    assert small.resolutions == (3, 5) and small.table_sizes == (16, 32)  # rounded up to multiples of 8


@pytest.mark.parametrize("dim,config", CONFIGS)
def test_values_match_brute_force_reference(dim, config):
    layout = grid_layout(dim, config)
    assert any(layout.hashed) and not all(layout.hashed), "configs must mix dense and hashed levels"
    encoding = _encoding(dim, config)
    # Include points outside the unit cube: indices wrap as in tiny-cuda-nn's uint32 arithmetic.
    points = torch.rand(40, dim, dtype=torch.float64) * 1.4 - 0.2
    expected = reference_encode(points, encoding.params[0].detach(), dim, config)
    torch.testing.assert_close(encoding(points), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dim", [2, 3])
def test_exact_at_grid_vertices(dim):
    config = HashGridConfig(n_levels=1, log2_hashmap_size=10, base_resolution=6, per_level_scale=1.0)
    encoding = _encoding(dim, config)
    scale = grid_layout(dim, config).scales[0]
    resolution = grid_layout(dim, config).resolutions[0]
    for vertex in itertools.product(range(resolution - 1), repeat=dim):
        point = torch.tensor([[(v - 0.5) / scale for v in vertex]], dtype=torch.float64)
        row = sum(v * resolution ** k for k, v in enumerate(vertex))
        torch.testing.assert_close(encoding(point)[0], encoding.params[0, row].detach(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dim,config", CONFIGS)
def test_input_gradient_matches_finite_differences(dim, config):
    encoding = _encoding(dim, config)
    points = torch.rand(25, dim, dtype=torch.float64)
    direction = torch.randn(25, config.n_output_dims, dtype=torch.float64)
    x = points.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad((encoding(x) * direction).sum(), x)
    step = 1e-6
    for k in range(dim):
        shift = torch.zeros_like(points)
        shift[:, k] = step
        numeric = ((encoding(points + shift) - encoding(points - shift)) * direction).sum(1) / (2 * step)
        torch.testing.assert_close(gradient[:, k], numeric, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dim,config", CONFIGS)
def test_gradcheck_and_gradgradcheck(dim, config):
    encoding = _encoding(dim, config)
    points = torch.rand(6, dim, dtype=torch.float64, requires_grad=True)

    def function(x, params):
        return torch.func.functional_call(encoding, {"params": params}, (x,))

    inputs = (points, encoding.params.detach().clone().requires_grad_(True))
    assert torch.autograd.gradcheck(function, inputs)
    assert torch.autograd.gradgradcheck(function, inputs)


def test_second_derivatives_of_the_jacobian_penalty_match_autograd_without_custom_functions():
    """d/dparams of ||d enc/dx||^2 through the custom Functions equals a plain-indexing version."""
    dim, config = CONFIGS[0]
    encoding = _encoding(dim, config)
    layout = grid_layout(dim, config)
    points = torch.rand(10, dim, dtype=torch.float64)

    def penalty(params, encode):
        x = points.clone().requires_grad_(True)
        y = encode(x, params)
        rows = [torch.autograd.grad(y[:, j].sum(), x, create_graph=True)[0] for j in range(y.shape[1])]
        return sum((r ** 2).sum() for r in rows)

    def plain(x, params):  # the same function with ordinary autograd indexing
        outs = []
        for level in range(config.n_levels):
            scale = layout.scales[level]
            position = x * scale + 0.5
            cell = torch.floor(position.detach())
            t = position - cell
            acc = 0
            for corner in itertools.product((0, 1), repeat=dim):
                vertex = (cell.long() + torch.tensor(corner)) % 2 ** 32
                if layout.hashed[level]:
                    index = vertex[:, 0]
                    for k in range(1, dim):
                        index = index ^ ((vertex[:, k] * PRIMES[k]) % 2 ** 32)
                else:
                    index = sum(vertex[:, k] * layout.resolutions[level] ** k for k in range(dim))
                row = layout.offsets[level] + index % layout.table_sizes[level]
                weight = torch.ones(x.shape[0], dtype=x.dtype)
                for k in range(dim):
                    weight = weight * (t[:, k] if corner[k] else 1 - t[:, k])
                acc = acc + weight[:, None] * params[0][row]
            outs.append(acc)
        return torch.cat(outs, dim=1)

    params = encoding.params.detach().clone().requires_grad_(True)
    (ours,) = torch.autograd.grad(penalty(params, lambda x, p: torch.func.functional_call(
        encoding, {"params": p}, (x,))), params)
    params2 = encoding.params.detach().clone().requires_grad_(True)
    (reference,) = torch.autograd.grad(penalty(params2, plain), params2)
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-10)


def test_several_tables_evaluate_each_point_with_its_own_table():
    dim, config = CONFIGS[0]
    encoding = make_encoding(dim, config, n_tables=3).double()
    with torch.no_grad():
        encoding.params.normal_()
    points = torch.rand(30, dim, dtype=torch.float64)
    table_index = torch.randint(0, 3, (30,))
    out = encoding(points, table_index)
    for t in range(3):
        single = make_encoding(dim, config).double()
        with torch.no_grad():
            single.params.copy_(encoding.params[t:t + 1])
        mask = table_index == t
        torch.testing.assert_close(out[mask], single(points[mask]))
        torch.testing.assert_close(encoding(points, t), single(points))
    with pytest.raises(ValueError, match="table_index"):
        encoding(points, 3)


def test_float32_matches_float64():
    dim, config = CONFIGS[1]
    encoding = _encoding(dim, config)
    points = torch.rand(500, dim, dtype=torch.float64)
    expected = encoding(points)
    actual = encoding.float()(points.float())
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-5)


def test_tcnn_config_uses_tcnn_names():
    config = HashGridConfig(n_levels=6, log2_hashmap_size=15, base_resolution=8, per_level_scale=1.5)
    assert config.to_tcnn() == {"otype": "HashGrid", "n_levels": 6, "n_features_per_level": 2,
                                "log2_hashmap_size": 15, "base_resolution": 8, "per_level_scale": 1.5,
                                "interpolation": "Linear"}


def test_state_dict_holds_only_the_table():
    encoding = make_encoding(2, HashGridConfig())
    assert list(encoding.state_dict()) == ["params"]
    assert encoding.params.shape == (1, grid_layout(2, HashGridConfig()).total_rows, 2)


def test_backend_selection_and_errors(monkeypatch):
    import neuralfield_reg.encoders as encoders
    from neuralfield_reg.encoders import native

    assert resolve_backend("torch") == "torch"
    assert make_encoding(2, HashGridConfig(), backend="torch").backend == "torch"
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("cuda")
    # A failed build: a named request raises with the reason; "auto" falls back with one warning.
    monkeypatch.setattr(native, "native_unavailable_reason", lambda: "no C++ compiler (test)")
    monkeypatch.setattr(encoders, "_fallback_warned", False)
    with pytest.raises(BackendUnavailableError, match="no C.. compiler"):
        resolve_backend("native")
    with pytest.warns(RuntimeWarning, match="no C.. compiler"):
        assert resolve_backend("auto") == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_backend("auto") == "torch"      # warned once only


def test_auto_prefers_the_native_kernels_when_they_build():
    from neuralfield_reg.encoders import native

    if native.native_unavailable_reason() is None:
        assert resolve_backend("auto") == "native"


@pytest.mark.parametrize("field,value", [("n_levels", 0), ("n_features_per_level", 3), ("log2_hashmap_size", 40),
                                         ("base_resolution", 1), ("per_level_scale", 0.5),
                                         ("interpolation", "Cubic")])
def test_config_rejects_out_of_range_values(field, value):
    with pytest.raises(ValueError, match=field):
        HashGridConfig(**{field: value})


def test_bad_points_shape():
    encoding = make_encoding(2, HashGridConfig())
    with pytest.raises(ValueError, match="points"):
        encoding(torch.rand(10, 3))
