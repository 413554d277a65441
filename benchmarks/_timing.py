"""Shared timing helper of the benchmark scripts."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import torch

from neuralfield_reg.app.benchmark_vs_icon import peak_memory_gib  # noqa: F401  (the benchmark scripts import it from here)


def step_times(function, device: torch.device, repeats: int, warmup: int = 2) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``function()`` after ``warmup`` calls, with the
    GPU synchronised around every timed call."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def run_isolated(script: str, arguments: list[str]) -> dict | str:
    """Run ``script arguments`` in a fresh Python process (so its peak memory is its own) and
    return the JSON object on its last output line, or the reason it failed."""
    done = subprocess.run([sys.executable, script, *arguments], capture_output=True, text=True)
    if done.returncode != 0:
        return done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit code {done.returncode}"
    return json.loads(done.stdout.strip().splitlines()[-1])
