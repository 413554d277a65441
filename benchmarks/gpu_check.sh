#!/usr/bin/env bash
# One prepared run for a lent GPU machine (device tool): build the CUDA kernels, run the CUDA tests
# (parity of the CUDA kernels with the torch backend and the C++ kernels, a fit on the GPU), then the
# fits with and without CUDA graphs, the encoder benchmark. Every section has its own time limit,
# so that one that hangs does not take the others' time. The log goes to $OUT/log.txt.
# SECTIONS picks what runs (default below); also: encoder_large fit3d fit2d fit_pairs gradicon.
set -uo pipefail
OUT=${OUT:-out/gpu}
SECTIONS=${SECTIONS:-"tests graphs encoder"}
want() { [[ " $SECTIONS " == *" $1 "* ]]; }
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} PYTHONPATH=$PWD
log() { echo "== $(date +%T) $*"; }
{
log "device"; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,temperature.gpu --format=csv
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
nvcc --version | tail -2
log "install"; python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
log "build"
time timeout 420 python3 -c "from neuralfield_reg._cuda_ext import load; m = load(verbose=False); print('with_cuda', m.with_cuda)" \
  || { log "build failed"; exit 1; }
if want tests; then
  log "tests (CUDA)"
  timeout 240 python3 -m pytest -q -m cuda -p no:cacheprovider -rs tests/test_native.py tests/test_fit.py \
    tests/test_static_step.py 2>&1 | tail -25
fi
if want graphs; then
  log "fit_pair with and without CUDA graphs: 2D 128^2, 2 mm brains, 160x384x384"
  timeout 300 python3 benchmarks/gpu_fit.py --cases 2d brain big --rounds 2
fi
if want encoder; then
  log "encoder 2D, the fit's 4096 points"; timeout 120 python3 benchmarks/encoder.py --device cuda --dim 2 --points 4096 --repeats 20
  log "encoder 3D, the fit's 4096 points"; timeout 120 python3 benchmarks/encoder.py --device cuda --dim 3 --points 4096 --repeats 20
fi
if want encoder_large; then
  log "encoder 2D, 262144 points"; timeout 120 python3 benchmarks/encoder.py --device cuda --dim 2 --points 262144 --repeats 10
  log "encoder 3D, 262144 points"; timeout 120 python3 benchmarks/encoder.py --device cuda --dim 3 --points 262144 --repeats 10
fi
if want fit3d; then
  log "fit 3D 160x384x384, default FitConfig (500 iterations)"
  timeout 300 python3 benchmarks/volume_3d.py --device cuda --cases 160x384x384:500 --backends native torch
fi
if want fit2d; then
  log "fit 2D 128^2 hollow shapes"; timeout 180 python3 benchmarks/encoder.py --device cuda --dim 2 --points 4096 --repeats 5 --fit 2
fi
if want fit_pairs; then log "fit_pairs"; timeout 240 python3 benchmarks/fit_pairs.py --device cuda --batches 1 4 16 64; fi
if want gradicon; then
  log "gradicon step"; timeout 240 python3 benchmarks/gradicon_step.py --device cuda --cases 2d:64:32 2d:128:32 3d:64:8 3d:128:2
fi
log "done"
} 2>&1 | tee "$OUT/log.txt"
