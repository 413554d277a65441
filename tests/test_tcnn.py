"""The tcnn backend (tiny-cuda-nn's grid encoding behind our interface).

tinycudann is optional, not on PyPI and CUDA-only, so two kinds of test:

* the wiring, everywhere: a stand-in ``tinycudann`` module whose ``Encoding`` has tcnn's public
  interface (constructor, flat ``params``, ``n_output_dims``) and computes with the torch backend
  on whatever parameters it holds. Against the torch backend with the same tables, this checks
  what our wrapper adds: the config handed over, each table passed in as tcnn's parameters (a
  wrapper that used tcnn's own parameters, or the wrong table, gives other numbers), points routed
  to their table, and first and second derivatives reaching ``params`` and the points;
* parity with the real tiny-cuda-nn, only where it imports and CUDA is present.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

import neuralfield_reg as nfr
from neuralfield_reg.encoders import HashGridConfig, TorchHashGridEncoding, resolve_backend
from neuralfield_reg.transforms.fields import MapPair
from neuralfield_reg.losses import inverse_consistency_terms


def _stand_in(extra_params: int = 0):
    """A ``tinycudann`` module with tcnn's Encoding interface, computing with the torch backend."""
    calls = []

    class Encoding(torch.nn.Module):
        def __init__(self, n_input_dims, encoding_config, seed=1337, dtype=None):
            super().__init__()
            calls.append({"n_input_dims": n_input_dims, "encoding_config": dict(encoding_config), "dtype": dtype})
            settings = {k: v for k, v in encoding_config.items() if k != "otype"}
            self.reference = TorchHashGridEncoding(n_input_dims, HashGridConfig(**settings))
            self.features = self.reference.config.n_features_per_level
            size = self.reference.params.numel() + extra_params
            self.params = torch.nn.Parameter(torch.full((size,), 0.5))      # never the tables we train
            self.n_output_dims = self.reference.n_output_dims

        def forward(self, x):
            table = self.params.reshape(1, -1, self.features)
            return torch.func.functional_call(self.reference, {"params": table}, (x, 0))

    module = types.ModuleType("tinycudann")
    module.Encoding = Encoding
    return module, calls


@pytest.fixture
def stand_in(monkeypatch):
    module, calls = _stand_in()
    monkeypatch.setitem(sys.modules, "tinycudann", module)
    return calls


CONFIGS = [
    (2, HashGridConfig(n_levels=4, log2_hashmap_size=8, base_resolution=4, per_level_scale=2.0)),
    (3, HashGridConfig(n_levels=3, log2_hashmap_size=9, base_resolution=3, per_level_scale=2.0,
                       interpolation="Smoothstep")),
]


def _pair(dim, config, n_tables):
    from neuralfield_reg.encoders.tcnn import TcnnHashGridEncoding
    torch.manual_seed(0)
    reference = TorchHashGridEncoding(dim, config, n_tables)
    with torch.no_grad():
        reference.params.normal_(0, 0.3)
    wrapped = TcnnHashGridEncoding(dim, config, n_tables)
    wrapped.load_state_dict(reference.state_dict())
    return reference, wrapped


def _first_and_second_order(encoding, points, table_index):
    """Values, dL/dparams and dL/dx of L = sum(sin(features)), then the gradients of
    ||dL/dx||^2 with respect to params and x (the penalty's second-order terms)."""
    x = points.clone().requires_grad_(True)
    features = encoding(x, table_index)
    grad_x, grad_params = torch.autograd.grad(features.sin().sum(), [x, encoding.params], create_graph=True)
    second_x, second_params = torch.autograd.grad(grad_x.square().sum(), [x, encoding.params])
    return [features.detach(), grad_params.detach(), grad_x.detach(), second_params, second_x]


@pytest.mark.parametrize("dim,config", CONFIGS)
def test_wrapper_matches_the_torch_backend_with_the_same_tables(stand_in, dim, config):
    reference, wrapped = _pair(dim, config, n_tables=3)
    points = torch.rand(200, dim, generator=torch.Generator().manual_seed(1))
    table_index = torch.randint(3, (200,), generator=torch.Generator().manual_seed(2))
    for index in (table_index, 2):
        expected = _first_and_second_order(reference, points, index)
        got = _first_and_second_order(wrapped, points, index)
        for name, a, b in zip(["values", "dL/dparams", "dL/dx", "d2/dparams", "d2/dx"], got, expected):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
        assert expected[0].abs().max() > 0.1 and expected[4].abs().max() > 0      # not a trivial case
    call = stand_in[-1]
    assert call["encoding_config"] == config.to_tcnn() and call["encoding_config"]["otype"] == "HashGrid"
    assert call["n_input_dims"] == dim and call["dtype"] == torch.float32


def test_maps_with_tcnn_tables_give_the_torch_backends_penalty(stand_in):
    config = CONFIGS[0][1]
    torch.manual_seed(3)
    reference = MapPair(2, encoding=config, hidden_widths=(16,), backend="torch")
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.normal_(0, 0.2)
    wrapped = MapPair(2, encoding=config, hidden_widths=(16,), backend="tcnn")
    wrapped.load_state_dict(reference.state_dict())
    assert wrapped.backend == "tcnn"
    points = torch.rand(64, 2, generator=torch.Generator().manual_seed(4))
    values = []
    for maps in (reference, wrapped):
        penalty = inverse_consistency_terms(maps, points)["gradient_icon"]
        grads = torch.autograd.grad(penalty, [maps.fields.encoding.params, maps.fields.weights[0]])
        values.append([penalty.detach(), *grads])
    for a, b in zip(values[1], values[0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert values[0][0] > 0


def test_errors(stand_in, monkeypatch):
    from neuralfield_reg.encoders.tcnn import TcnnHashGridEncoding
    dim, config = CONFIGS[0]
    with pytest.raises(nfr.BackendUnavailableError, match="CUDA devices only"):
        resolve_backend("tcnn", "cpu")
    assert resolve_backend("tcnn") == "tcnn"
    wrapped = TcnnHashGridEncoding(dim, config, 2)
    with pytest.raises(ValueError, match="float32"):
        wrapped(torch.rand(4, dim, dtype=torch.float64), 0)
    with pytest.raises(ValueError, match="table_index"):
        wrapped(torch.rand(4, dim), torch.tensor([0, 1, 2, 0]))
    module, _ = _stand_in(extra_params=8)
    monkeypatch.setitem(sys.modules, "tinycudann", module)
    with pytest.raises(RuntimeError, match="lays out its tables differently"):
        TcnnHashGridEncoding(dim, config, 1)


def _real_tcnn_reason():
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        import tinycudann  # noqa: F401
    except Exception as error:  # noqa: BLE001
        return f"tinycudann is not importable: {error}"
    return None


@pytest.mark.skipif(_real_tcnn_reason() is not None, reason=str(_real_tcnn_reason()))
@pytest.mark.parametrize("dim,config", CONFIGS + [
    (2, HashGridConfig(n_levels=6, log2_hashmap_size=10, base_resolution=8, per_level_scale=2.0)),  # hashed
])
def test_real_tcnn_matches_the_torch_backend(dim, config):
    """float32 on both sides; tcnn sums in another order (and atomics on the table gradient),
    hence the tolerances."""
    from neuralfield_reg.encoders.tcnn import TcnnHashGridEncoding
    torch.manual_seed(0)
    reference = TorchHashGridEncoding(dim, config, 2).cuda()
    with torch.no_grad():
        reference.params.normal_(0, 0.3)
    wrapped = TcnnHashGridEncoding(dim, config, 2).cuda()
    wrapped.load_state_dict(reference.state_dict())
    points = torch.rand(1000, dim, device="cuda")
    table_index = torch.randint(2, (1000,), device="cuda")
    expected = _first_and_second_order(reference, points, table_index)
    got = _first_and_second_order(wrapped, points, table_index)
    for name, a, b in zip(["values", "dL/dparams", "dL/dx", "d2/dparams", "d2/dx"], got, expected):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4 * (1 + b.abs().max().item()), msg=name)
