"""Data-parallel GradICON training under torchrun: two CPU processes (gloo) against one process."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from neuralfield_reg import gradicon
from neuralfield_reg.data import ShapePairDataset

SCRIPT = textwrap.dedent("""
    import sys, torch
    from neuralfield_reg import gradicon
    from neuralfield_reg.data import ShapePairDataset
    from neuralfield_reg.app.distributed import init_from_environment, shutdown

    rank, world, device = init_from_environment(backend="gloo")
    torch.manual_seed(0)
    model = gradicon.default_model(2, (16, 16), levels=2, widths=(4, 8))
    history = gradicon.train(model, ShapePairDataset(12, 16, hollow=False, seed=1), similarity="ssd",
                             batch_size=4, lr=1e-3, steps=3, progress=False, device=device)
    torch.save({"world": world, "state": model.state_dict(), "loss": history["loss"]},
               f"{sys.argv[1]}/rank{rank}.pt")
    shutdown()
""")


def single_process_reference():
    torch.manual_seed(0)
    model = gradicon.default_model(2, (16, 16), levels=2, widths=(4, 8))
    history = gradicon.train(model, ShapePairDataset(12, 16, hollow=False, seed=1), similarity="ssd",
                             batch_size=4, lr=1e-3, steps=3, progress=False)
    return model.state_dict(), history["loss"]


def test_two_process_training_matches_one_process(tmp_path):
    script = tmp_path / "train_ddp.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    for name, value in ranks[0]["state"].items():          # DDP keeps the replicas identical
        assert torch.equal(value, ranks[1]["state"][name]), name
    assert ranks[0]["loss"] == ranks[1]["loss"]            # the history is averaged over ranks
    state, loss = single_process_reference()
    # Two processes with 2 pairs each take the steps one process takes with 4 (same pairs, same
    # noise), up to float summation order.
    for name, value in state.items():
        torch.testing.assert_close(ranks[0]["state"][name], value, rtol=1e-4, atol=1e-6)
    assert ranks[0]["loss"] == pytest.approx(loss, rel=1e-4)
