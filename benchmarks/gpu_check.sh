#!/usr/bin/env bash
# One prepared run for a lent GPU machine (device tool): build the CUDA kernels, run the test suite
# (CUDA parity tests included), then the encoder benchmark and fit timings. Logs go to $OUT.
# SECTIONS picks what runs (default all): tests encoder fit2d fit3d gradicon batched.
set -uo pipefail
OUT=${OUT:-out/gpu}
SECTIONS=${SECTIONS:-"tests encoder fit2d fit3d gradicon batched"}
want() { [[ " $SECTIONS " == *" $1 "* ]]; }
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
log() { echo "== $(date +%T) $*"; }
{
log "device"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
log "install"; python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
log "build"; time python3 -c "from neuralfield_reg._cuda_ext import load; m = load(verbose=False); print('with_cuda', m.with_cuda)" || exit 1
if want tests; then log "tests"; python3 -m pytest -q -x tests -p no:cacheprovider 2>&1 | tail -15; fi
if want encoder; then
log "encoder 2D"; python3 benchmarks/encoder.py --device cuda --dim 2 --points 65536 --repeats 30
log "encoder 3D"; python3 benchmarks/encoder.py --device cuda --dim 3 --points 1048576 --repeats 10
fi
if want fit2d; then log "fit 2D 128^2"; python3 benchmarks/encoder.py --device cuda --dim 2 --points 4096 --repeats 10 --fit 3; fi
if want batched; then log "fit_pairs"; python3 benchmarks/fit_pairs.py --device cuda --batches 1 4 16 64; fi
if want gradicon; then
log "gradicon step"; python3 benchmarks/gradicon_step.py --device cuda --cases 2d:64:32 2d:128:32 3d:64:8 3d:128:2
log "gradicon triangles 2 min"; python3 demos/gradicon_triangles.py --device cuda --runs gradicon:1 --minutes 2 --test-pairs 100 --eval-every 200 --quiet --out "$OUT/gradicon_triangles"
fi
want fit3d && log "fit 3D 160x384x384" && python3 - <<'PY'
import time, numpy as np, torch, neuralfield_reg as nfr
from neuralfield_reg.metrics import folding_fraction
shape = (160, 384, 384)
grid = np.stack(np.meshgrid(*[np.linspace(0, 1, n, dtype=np.float32) for n in shape], indexing="ij"))
def shell(centre, radii):
    r = np.sqrt(sum(((grid[k] - centre[k]) / radii[k]) ** 2 for k in range(3)))
    return np.exp(-((r - 1.0) / 0.05) ** 2).astype(np.float32)
moving = shell((0.5, 0.48, 0.52), (0.30, 0.35, 0.28))
fixed = shell((0.52, 0.5, 0.5), (0.26, 0.30, 0.33))
for backend in ("native", "torch"):
    config = nfr.FitConfig(backend=backend)
    torch.cuda.synchronize(); start = time.perf_counter()
    result = nfr.fit_pair(moving, fixed, config, device="cuda", progress=False)
    torch.cuda.synchronize(); seconds = time.perf_counter() - start
    print(f"{backend}: fit {seconds:.1f} s for {config.iterations} iterations ({1000 * seconds / config.iterations:.1f} ms/it incl. affine), "
          f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB", flush=True)
    start = time.perf_counter(); det = result.jacobian_determinant(); torch.cuda.synchronize()
    print(f"  dense det J over {det.size} voxels in {time.perf_counter() - start:.1f} s, folds {100 * folding_fraction(det):.4f}%")
    torch.cuda.reset_peak_memory_stats()
PY
log "done"
} 2>&1 | tee "$OUT/log.txt"
