"""The compiled backend (cuda_ext/) against the torch backend: values, first and second derivatives.

On the CPU these always run (the kernels are built on first use; a failed build fails here with the
compiler's reason). The CUDA variants run when a GPU is present.
"""

import pytest
import torch

from neuralfield_reg.encoders import HashGridConfig, make_encoding

CONFIGS = [  # every config mixes dense and hashed levels
    (2, HashGridConfig(n_levels=4, log2_hashmap_size=6, base_resolution=3, per_level_scale=1.9)),
    (2, HashGridConfig(n_levels=3, n_features_per_level=4, log2_hashmap_size=5, base_resolution=4,
                       per_level_scale=1.5, interpolation="Smoothstep")),
    (3, HashGridConfig(n_levels=3, log2_hashmap_size=7, base_resolution=3, per_level_scale=2.0)),
    (3, HashGridConfig(n_levels=2, n_features_per_level=1, log2_hashmap_size=6, base_resolution=4,
                       per_level_scale=1.7, interpolation="Smoothstep")),
]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def pair_of_encodings(dim, config, device, dtype, n_tables=2):
    reference = make_encoding(dim, config, backend="torch", n_tables=n_tables).to(device, dtype)
    native = make_encoding(dim, config, backend="native", n_tables=n_tables).to(device, dtype)
    with torch.no_grad():
        reference.params.normal_()
        native.params.copy_(reference.params)
    return reference, native


def jacobian_penalty(encoding, points, table_index, weights):
    """sum over outputs of ||d out / d x||^2 weighted: needs the double backward."""
    x = points.clone().requires_grad_(True)
    out = encoding(x, table_index)
    (gradient,) = torch.autograd.grad((out * weights).sum(), x, create_graph=True)
    return (gradient ** 2).sum() + (out ** 2).sum()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dim,config", CONFIGS)
def test_float32_parity_of_values_and_derivatives(dim, config, device):
    # Tolerances: float32 with features of order 1 and scales up to ~10: 1e-5 relative on values and
    # first derivatives; second-order terms carry products of scales, 1e-4.
    reference, native = pair_of_encodings(dim, config, device, torch.float32)
    points = (torch.rand(300, dim, device=device) * 1.2 - 0.1)
    table_index = torch.randint(0, 2, (300,), device=device)
    weights = torch.randn(300, config.n_output_dims, device=device)
    torch.testing.assert_close(native(points, table_index), reference(points, table_index), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(native(points, 1), reference(points, 1), rtol=1e-5, atol=1e-5)

    results = []
    for encoding in (reference, native):
        x = points.clone().requires_grad_(True)
        out = encoding(x, table_index)
        grad_x, grad_table = torch.autograd.grad((out * weights).sum(), [x, encoding.params])
        penalty = jacobian_penalty(encoding, points, table_index, weights)
        second_table, = torch.autograd.grad(penalty, encoding.params)
        x2 = points.clone().requires_grad_(True)
        out2 = encoding(x2, table_index)
        (g,) = torch.autograd.grad((out2 * weights).sum(), x2, create_graph=True)
        (second_x,) = torch.autograd.grad((g * torch.linspace(-1, 1, dim, device=device)).sum(), x2)
        results.append((grad_x, grad_table, second_table, second_x))
    for ours, theirs, tolerance in zip(results[1], results[0], (1e-5, 1e-5, 1e-4, 1e-4)):
        torch.testing.assert_close(ours, theirs, rtol=tolerance, atol=tolerance * 10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dim,config", CONFIGS)
def test_float64_gradcheck_and_gradgradcheck(dim, config, device):
    _, native = pair_of_encodings(dim, config, device, torch.float64)
    points = torch.rand(5, dim, dtype=torch.float64, device=device, requires_grad=True)
    table_index = torch.tensor([0, 1, 1, 0, 1], device=device)

    def function(x, params):
        return torch.func.functional_call(native, {"params": params}, (x, table_index))

    inputs = (points, native.params.detach().clone().requires_grad_(True))
    assert torch.autograd.gradcheck(function, inputs)
    assert torch.autograd.gradgradcheck(function, inputs)


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(128, 128), (160, 384, 384)])
def test_cuda_kernels_at_the_fits_default_encoding(shape):
    """The fit's default encodings (2^14-2^19 rows per table, hashed fine 3D levels) on 20000
    points: the CUDA kernels against the torch backend on the same GPU and against the C++ kernels,
    first and second order. float32 with atomicAdd (summation order differs): 1e-4 relative."""
    from neuralfield_reg.config import default_encoding

    dim, config = len(shape), default_encoding(shape)
    reference, native = pair_of_encodings(dim, config, "cuda", torch.float32)
    native_cpu = make_encoding(dim, config, backend="native", n_tables=2)
    with torch.no_grad():
        native_cpu.params.copy_(reference.params.cpu())
    points = torch.rand(20000, dim, device="cuda")
    table_index = torch.randint(0, 2, (20000,), device="cuda")
    weights = torch.randn(20000, config.n_output_dims, device="cuda")
    results = []
    for encoding, device in ((reference, "cuda"), (native, "cuda"), (native_cpu, "cpu")):
        x = points.to(device).requires_grad_(True)
        out = encoding(x, table_index.to(device))
        (grad_x,) = torch.autograd.grad((out * weights.to(device)).sum(), x, create_graph=True)
        penalty = (grad_x ** 2).sum()
        second_x, second_table = torch.autograd.grad(penalty, [x, encoding.params])
        results.append([t.detach().cpu() for t in (out, grad_x, second_x, second_table)])
    assert results[0][0].abs().max() > 0.1 and results[0][3].abs().max() > 0  # not a vacuous comparison
    for ours in results[1:]:
        for mine, theirs in zip(ours, results[0]):
            scale = theirs.abs().max().item()
            torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4 * scale)


def test_third_derivatives_raise_instead_of_being_zero():
    dim, config = CONFIGS[1]
    _, native = pair_of_encodings(dim, config, "cpu", torch.float64)
    x = torch.rand(4, dim, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(native(x).sum(), x, create_graph=True)
    (h,) = torch.autograd.grad((g ** 2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="third derivatives"):
        torch.autograd.grad(h.sum() + (x ** 2).sum(), x)


def test_native_fit_matches_torch_fit():
    import neuralfield_reg as nfr
    from neuralfield_reg.data import Shape

    moving, _ = Shape("triangle", (0.52, 0.47), 0.3, 0.4).render(48)
    fixed, _ = Shape("circle", (0.5, 0.55), 0.27, 0.0).render(48)
    config = nfr.FitConfig(iterations=20, gradient_icon_points=128, similarity_points=1024,
                           affine=nfr.AffineConfig(iterations=10))
    results = [nfr.fit_pair(moving, fixed, dataclasses_replace(config, backend=b), progress=False)
               for b in ("torch", "native")]
    assert results[1].backend == "native"
    losses = [r.history["loss"] for r in results]
    assert losses[0][0] == pytest.approx(losses[1][0], rel=1e-5)
    assert losses[0][-1] == pytest.approx(losses[1][-1], rel=1e-2)


def dataclasses_replace(config, **changes):
    import dataclasses
    return dataclasses.replace(config, **changes)


def test_the_build_runs_this_environments_ninja(monkeypatch, tmp_path):
    """With ninja in this environment's scripts folder, the build finds that one first even when the
    environment is not activated (another ninja on PATH would read the build log as out of date and
    rebuild); PATH is restored afterwards."""
    import os
    import shutil
    import sysconfig

    from neuralfield_reg._cuda_ext import loader

    scripts = sysconfig.get_path("scripts")
    if shutil.which("ninja", path=scripts) is None:
        pytest.skip("ninja is not installed in this environment's scripts folder")
    other = tmp_path / "ninja"                         # a stand-in for a system ninja earlier on PATH
    other.write_text("#!/bin/sh\n")
    other.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert shutil.which("ninja") == str(other)
    with loader._this_environments_ninja():
        assert os.path.dirname(shutil.which("ninja")) == scripts
    assert shutil.which("ninja") == str(other)


def test_each_torch_installation_keeps_its_own_build(monkeypatch):
    """The build's name carries the PyTorch installation it compiles against: two environments
    sharing the cache folder do not rebuild each other's kernels (the build commands name each
    installation's include folders), while one environment finds its own build again."""
    import torch

    from neuralfield_reg._cuda_ext import loader

    here = loader._environment_tag()
    assert loader._environment_tag() == here
    monkeypatch.setattr(torch, "__file__", "/another/environment/site-packages/torch/__init__.py")
    elsewhere = loader._environment_tag()
    assert elsewhere != here
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    assert loader._environment_tag() not in (here, elsewhere)


def test_the_kernels_build_and_agree_without_ninja(tmp_path):
    """Without ninja (PyTorch's just-in-time builds need it) the kernels are compiled by setuptools
    into the cache folder, once (a second process finds the build), and a fit on them follows the
    fit on the usual build. In fresh processes: one process holds one build of the module."""
    import json
    import os
    import subprocess
    import sys

    import numpy as np

    pytest.importorskip("setuptools")
    script = """
import json, sys, dataclasses, numpy as np
from torch.utils import cpp_extension
if sys.argv[1] == "without":
    cpp_extension.is_ninja_available = lambda: False
import neuralfield_reg as nfr
from neuralfield_reg._cuda_ext import loader
pair = np.zeros((2, 24, 24), np.float32)
pair[0, 6:16, 5:15] = 1.0
pair[1, 8:18, 7:17] = 1.0
config = dataclasses.replace(nfr.FitConfig(), iterations=20, affine=None, backend="native")
history = nfr.fit_pair(pair[0], pair[1], config, progress=False).history
print(json.dumps({"file": loader.load().__file__, "history": history}))
"""
    def run(which, folder):
        environment = dict(os.environ, TORCH_EXTENSIONS_DIR=str(folder), NEURALFIELD_REG_QUIET="1")
        if folder is None:
            environment.pop("TORCH_EXTENSIONS_DIR")
        done = subprocess.run([sys.executable, "-c", script, which], capture_output=True, text=True, env=environment)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    usual = run("with", os.environ.get("TORCH_EXTENSIONS_DIR"))
    built = run("without", tmp_path)
    assert built["file"].startswith(str(tmp_path)) and not usual["file"].startswith(str(tmp_path))
    assert any(path.name == "setuptools_build.txt" for path in tmp_path.rglob("*"))
    stamp_time = next(tmp_path.rglob("setuptools_build.txt")).stat().st_mtime
    again = run("without", tmp_path)                                     # found, not rebuilt
    assert again["file"] == built["file"] and next(tmp_path.rglob("setuptools_build.txt")).stat().st_mtime == stamp_time
    for name, values in usual["history"].items():
        np.testing.assert_allclose(built["history"][name], values, rtol=1e-4, atol=1e-7)


def test_a_recorded_build_is_imported_without_the_build_machinery(monkeypatch, tmp_path):
    """After a load, the build's record (library, hash of what it was built from) lets the next
    load import the library directly; a record of another hash, of a missing library or an
    unreadable one is passed over (the usual load then runs)."""
    import json

    from neuralfield_reg._cuda_ext import loader

    module = loader.load()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    name = module.__name__
    assert loader._record_path(name) == tmp_path / f"{name}.json"
    loader._write_record(name, "digest-1", module)
    assert json.loads((tmp_path / f"{name}.json").read_text())["library"] == module.__file__
    assert [path.name for path in tmp_path.iterdir()] == [f"{name}.json"]       # no temporary file left
    again = loader._load_recorded(name, "digest-1")
    assert again is not None and again.__file__ == module.__file__ and hasattr(again, "similarity")
    assert loader._load_recorded(name, "digest-2") is None
    assert loader._load_recorded("another_build", "digest-1") is None
    (tmp_path / f"{name}.json").write_text(json.dumps({"digest": "digest-1", "library": str(tmp_path / "gone.so"),
                                                       "module": name}))
    assert loader._load_recorded(name, "digest-1") is None
    (tmp_path / f"{name}.json").write_text("{not json")
    assert loader._load_recorded(name, "digest-1") is None


def test_the_build_hash_follows_sources_flags_and_name(tmp_path, monkeypatch):
    from neuralfield_reg._cuda_ext import loader

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    source = tmp_path / "kernel.cpp"
    source.write_text("int f() { return 1; }\n")
    first = loader._build_digest("build", [str(source)], ["-O3"], {})
    assert loader._build_digest("build", [str(source)], ["-O3"], {}) == first
    assert loader._build_digest("build_cuda", [str(source)], ["-O3"], {}) != first
    assert loader._build_digest("build", [str(source)], ["-O2"], {}) != first
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert loader._build_digest("build", [str(source)], ["-O3"], {}) != first
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    source.write_text("int f() { return 2; }\n")
    assert loader._build_digest("build", [str(source)], ["-O3"], {}) != first


def test_a_new_process_loads_the_recorded_build_directly():
    """In a fresh process the kernels load without importing torch.utils.cpp_extension (and with it
    setuptools), from the library this process loaded."""
    import subprocess
    import sys

    from neuralfield_reg._cuda_ext import loader

    library = loader.load().__file__
    script = ("import sys; from neuralfield_reg._cuda_ext import loader; module = loader.load(); "
              "print(module.__file__, 'torch.utils.cpp_extension' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == [library, "False"]
