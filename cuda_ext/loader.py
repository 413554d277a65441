"""Build (just in time, with torch.utils.cpp_extension and ninja, or setuptools where ninja is
missing) and load the hash-grid kernels.

The C++ kernels are always built; the CUDA kernels are added when PyTorch has CUDA and a CUDA
toolkit (nvcc) is found. The C++ is compiled for the building machine's CPU (``-march=native``). The
build is cached by PyTorch (``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``), per
kind of CPU and per installation of PyTorch (each Python environment keeps its own build), and redone
when a source changes. ``load()`` raises
``NativeBuildError`` with the reason when the extension cannot be built or imported.

A successful load leaves a record (the built library and a hash of the sources, flags and build
name: ``{name}.json`` in ``TORCH_EXTENSIONS_DIR``, or else in ``~/.cache/neuralfield_reg``); the next
process whose hash matches imports that library directly. Importing ``torch.utils.cpp_extension``
(it imports setuptools) and asking ninja took 0.14-0.18 s of every ``nfreg`` command.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent
NAME = "neuralfield_reg_hashgrid"

_module = None
_error: str | None = None


class NativeBuildError(RuntimeError):
    """The compiled kernels could not be built or loaded; the message says why."""


def _with_cuda() -> bool:
    import torch

    if os.environ.get("NEURALFIELD_REG_NO_CUDA_BUILD") or not torch.cuda.is_available():
        return False
    from torch.utils import cpp_extension

    return cpp_extension.CUDA_HOME is not None


def _cpu_tag() -> str:
    """A short hash of this CPU's model and instruction-set flags. The C++ kernels are built with
    ``-march=native``, so the cached build is kept per CPU kind (e.g. a home directory shared by
    machines with different CPUs never loads a build that uses instructions the CPU lacks)."""
    import hashlib
    import platform

    description = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("model name", "flags", "Features")):
                    description += line
                if line.strip() == "":
                    break                      # the first processor's block is enough
    except OSError:
        pass
    return hashlib.sha1(description.encode()).hexdigest()[:8]


def _environment_tag() -> str:
    """A short hash of the PyTorch installation the kernels compile against (its folder and version)
    and of the Python version. A build's commands name that installation's include folders, so two
    environments sharing one build folder would each find the other's build out of date and rebuild
    it, half a minute every time the environment changes; with the tag each keeps its own."""
    import hashlib

    import torch

    description = f"{os.path.dirname(os.path.realpath(torch.__file__))}|{torch.__version__}|{sys.version}"
    return hashlib.sha1(description.encode()).hexdigest()[:8]


@contextlib.contextmanager
def _this_environments_ninja():
    """PATH with this Python environment's scripts folder first while the build runs, when ninja
    is installed there (the ``native`` extra): ninja is then the same one whether or not the
    environment is activated. (Two ninja versions read each other's build log as out of date, so a
    system ninja on PATH in one shell and the environment's in another would rebuild every time.)"""
    scripts = sysconfig.get_path("scripts")
    if not scripts or shutil.which("ninja", path=scripts) is None:
        yield
        return
    path = os.environ.get("PATH", "")
    os.environ["PATH"] = scripts + os.pathsep + path
    try:
        yield
    finally:
        os.environ["PATH"] = path


def _is_built(cpp_extension, name: str) -> bool:
    """Whether a build of ``name`` is in PyTorch's extension cache (it may still be redone when a
    source changed; then the build runs without the notice)."""
    try:
        folder = cpp_extension._get_build_directory(name, verbose=False)
    except Exception:  # noqa: BLE001 - a private helper: when it moves, just announce the build
        return False
    return os.path.exists(os.path.join(folder, f"{name}.so")) or os.path.exists(os.path.join(folder, _STAMP))


_STAMP = "setuptools_build.txt"


@contextlib.contextmanager
def _compiler_output(log: str, verbose: bool):
    """The compiler's output (it writes to this process's stdout and stderr) into ``log`` rather
    than the terminal, unless ``verbose``; a failed build's error carries the log's end."""
    if verbose:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(log, "wb") as file:
            os.dup2(file.fileno(), 1)
            os.dup2(file.fileno(), 2)
            try:
                yield
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    except Exception as error:
        with open(log, "rb") as file:
            tail = file.read()[-3000:].decode(errors="replace")
        raise RuntimeError(f"{error}; the compiler's last output ({log}):\n{tail}") from error
    finally:
        for descriptor in saved:
            os.close(descriptor)


def _import_library(module_name: str, library: str):
    """The extension module ``module_name`` from the built library ``library``."""
    spec = importlib.util.spec_from_file_location(module_name, library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load_without_ninja(cpp_extension, name: str, sources: list[str], flags: list[str], extra: dict,
                        digest: str, verbose: bool):
    """The same build as ``cpp_extension.load`` where ninja is missing (PyTorch's just-in-time
    builds need it): setuptools compiles the sources one after another (slower, once) with
    PyTorch's ``BuildExtension`` into the same cache folder (one per CPU kind and PyTorch
    installation, by ``name``), and the build is redone when a source or a flag changes (a stamp
    file holds their hash, ``digest``: _build_digest's)."""
    from setuptools import Distribution
    from torch.utils.file_baton import FileBaton

    folder = cpp_extension._get_build_directory(name, verbose)
    library = os.path.join(folder, name + sysconfig.get_config_var("EXT_SUFFIX"))
    stamp = os.path.join(folder, _STAMP)
    baton = FileBaton(os.path.join(folder, "lock"))
    if baton.try_acquire():
        try:
            current = Path(stamp).read_text() if os.path.exists(stamp) else None
            if current != digest or not os.path.exists(library):
                cuda = "extra_cuda_cflags" in extra
                kind = cpp_extension.CUDAExtension if cuda else cpp_extension.CppExtension
                compile_args = {"cxx": flags, "nvcc": extra["extra_cuda_cflags"]} if cuda else flags
                extension = kind(name, sources, include_dirs=[str(SOURCE_DIR)], extra_compile_args=compile_args,
                                 extra_link_args=["-fopenmp"])
                build = cpp_extension.BuildExtension.with_options(use_ninja=False)
                distribution = Distribution({"name": name, "ext_modules": [extension], "cmdclass": {"build_ext": build}})
                distribution.verbose = int(verbose)
                command = distribution.get_command_obj("build_ext")
                command.build_lib, command.build_temp = folder, os.path.join(folder, "setuptools_objects")
                with _compiler_output(os.path.join(folder, "setuptools_build.log"), verbose):
                    distribution.run_command("build_ext")
                Path(stamp).write_text(digest)
        finally:
            baton.release()
    else:
        baton.wait()                             # another process is building the same kernels
    return _import_library(name, library)


def _record_path(name: str) -> Path:
    """Where the record of build ``name`` is kept (see the module docstring)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "neuralfield_reg")
    return Path(root) / f"{name}.json"


def _build_digest(name: str, sources: list[str], flags: list[str], extra: dict) -> str:
    """A hash of everything a build depends on here: its name (CPU kind, PyTorch installation,
    CUDA or not), the flags, the extensions folder, and every source and header."""
    digest = hashlib.sha1(repr((name, flags, sorted(extra.items()), os.environ.get("TORCH_EXTENSIONS_DIR"))).encode())
    for source in sorted(set(sources) | {str(path) for path in SOURCE_DIR.glob("*.h")}):
        digest.update(Path(source).read_bytes())
    return digest.hexdigest()


def _load_recorded(name: str, digest: str):
    """The library a record names when its hash is ``digest`` and the library is there, else None
    (no record, another build, a library that does not import: then the usual load runs)."""
    try:
        record = json.loads(_record_path(name).read_text())
        if record["digest"] != digest or not os.path.isfile(record["library"]):
            return None
        return _import_library(record["module"], record["library"])
    except Exception:  # noqa: BLE001 - any unusable record means: load the usual way
        return None


def _write_record(name: str, digest: str, module) -> None:
    """Record a loaded build (written to a temporary file, then renamed: a process reading it
    meanwhile sees the old record or the new one); a folder that cannot be written is skipped."""
    path = _record_path(name)
    text = json.dumps({"digest": digest, "library": os.path.abspath(module.__file__), "module": module.__name__})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    except OSError:
        return
    try:
        with os.fdopen(descriptor, "w") as file:
            file.write(text)
        os.replace(temporary, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(temporary)


def load(verbose: bool = False):
    """The compiled extension module (built on first use, then cached for the process)."""
    global _module, _error
    if _module is not None:
        return _module
    if _error is not None:
        raise NativeBuildError(_error)
    try:
        sources = [str(SOURCE_DIR / source) for source in ("bindings.cpp", "hashgrid_cpu.cpp", "fused_cpu.cpp",
                                                                 "similarity_cpu.cpp", "optim_cpu.cpp")]
        flags = ["-O3", "-march=native", "-ffp-contract=fast", "-fno-math-errno", "-fopenmp"]
        name = f"{NAME}_{_cpu_tag()}_{_environment_tag()}"
        extra = {}
        if _with_cuda():
            sources.append(str(SOURCE_DIR / "hashgrid_cuda.cu"))
            flags.append("-DWITH_CUDA")
            extra["extra_cuda_cflags"] = ["-O3", "-DWITH_CUDA"]
            name += "_cuda"
        digest = _build_digest(name, sources, flags, extra)
        _module = _load_recorded(name, digest)
        if _module is not None:
            return _module
        from torch.utils import cpp_extension

        announce = not _is_built(cpp_extension, name) and not os.environ.get("NEURALFIELD_REG_QUIET")
        if announce:
            how_long = ("about half a minute" if cpp_extension.is_ninja_available() else
                        "about two minutes without ninja, `pip install ninja` halves it")
            print(f"neuralfield_reg: building the compiled kernels for this machine (once, {how_long}; "
                  "NEURALFIELD_REG_QUIET=1 hides this)...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        with _this_environments_ninja():
            if cpp_extension.is_ninja_available():
                _module = cpp_extension.load(name=name, sources=sources, extra_cflags=flags,
                                             extra_ldflags=["-fopenmp"], extra_include_paths=[str(SOURCE_DIR)],
                                             verbose=verbose, **extra)
            else:
                _module = _load_without_ninja(cpp_extension, name, sources, flags, extra, digest, verbose)
        if announce:
            print(f"neuralfield_reg: kernels built in {time.perf_counter() - started:.0f} s", file=sys.stderr,
                  flush=True)
        _write_record(name, digest, _module)
    except Exception as error:  # noqa: BLE001 - any build failure is reported the same way
        _error = f"building the hash-grid kernels in {SOURCE_DIR} failed: {type(error).__name__}: {error}"
        raise NativeBuildError(_error) from error
    return _module
