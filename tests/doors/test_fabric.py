"""``DSD`` in Lightning Fabric loops over 2 real gloo processes (``fabric_worker.py``): DDP through
``fabric.setup(model, optimizer)`` and FSDP2 through Fabric's ``ModelParallelStrategy`` with
``fabric.setup_optimizers``; masks equal to the one-device masks on every rank, zeros after every step and in
every forward pass (FSDP2's gathered copies included), and a bit-identical resume through ``fabric.save`` /
``fabric.load``."""

from __future__ import annotations

import glob

import pytest
import torch
from helpers import TESTS, run_worker
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_loop import run_docs_example

from lightning_dsd.rules.plan import MaskPlan

WORKER = TESTS / "fabric_worker.py"
TARGETS = ["0.weight", "2.weight", "4.weight"]

pytestmark = pytest.mark.slow


SHARDED = {"ddp": {"Parameter"}, "fsdp": {"DTensor"}, "tp": {"DTensor", "Parameter"}}


@pytest.mark.parametrize("strategy", sorted(SHARDED))
def test_a_fabric_loop_prunes_like_one_device_keeps_every_forward_sparse_and_resumes_bit_identically(
    tmp_path, strategy
):
    (tmp_path / "full").mkdir()
    # A SummaryWriter on rank 0 only (None on rank 1), as the docs allow: every rank must gather alike.
    full = run_worker(WORKER, tmp_path / "full", "--strategy", strategy, "--save-at", "2", "--writer", ranks=2)
    expected = MaskPlan((0.5,)).decide(full[0]["dense_end"], cycle=0)
    for rank in full:
        assert rank["names"] == TARGETS, "the model's own names, without Fabric's `_forward_module.` prefix"
        assert set(rank["sharded"].values()) == SHARDED[strategy]
        assert all(torch.equal(rank["masks"][n], expected[n]) for n in TARGETS), "the one-device masks"
        steps = 8 if strategy == "tp" else 4  # tensor parallel: one data-parallel replica reads every batch
        assert [phase for phase, _ in rank["steps"]] == ["dense"] * steps + ["sparse"] * 2 * steps + ["redense"] * steps
        assert all(zeros for _, zeros in rank["steps"]), "pruned entries zero after every step"
        assert all(same for _, same, _ in rank["forwards"]), "every forward computed with the stored weights"
        assert all(zeros for phase, _, zeros in rank["forwards"] if phase == "sparse")
        assert rank["lrs"] == pytest.approx([9e-3, 8.1e-3, 7.29e-4, 6.561e-4]), "StepLR, and x0.1 at re-dense"
        assert rank["finished"]
    assert all(torch.equal(full[0]["final"][n], full[1]["final"][n]) for n in TARGETS), "ranks agree"
    (events,) = glob.glob(str(tmp_path / "full" / "tb" / "events.out.tfevents.*"))
    accumulator = EventAccumulator(events, size_guidance={"histograms": 0})
    accumulator.Reload()
    for name, size in (("0.weight", 120), ("2.weight", 70), ("4.weight", 7)):  # whole tensors, not rank 0's shard
        (histogram,) = accumulator.Histograms(f"dsd_weights/{name}/2_after_pruning")
        assert histogram.histogram_value.num == size
        assert len(accumulator.Histograms(f"dsd_weights_timeline/{name}")) == 4

    checkpoint = tmp_path / "full" / "mid_sparse.ckpt"  # after epoch 2 of 4: mid-sparse
    (tmp_path / "resumed").mkdir()
    resumed = run_worker(WORKER, tmp_path / "resumed", "--strategy", strategy, "--resume", str(checkpoint), ranks=2)
    for before, after in zip(full, resumed, strict=True):
        steps = 8 if strategy == "tp" else 4
        assert [phase for phase, _ in after["steps"]] == ["sparse"] * steps + ["redense"] * steps
        assert all(zeros for _, zeros in after["steps"])
        assert all(same for _, same, _ in after["forwards"])
        for name in TARGETS:
            assert torch.equal(before["final"][name], after["final"][name]), f"{name} differs after the resume"


def test_the_docs_fabric_script_runs_as_written(tmp_path):
    output = run_docs_example(tmp_path, "# fabric_dsd.py")
    assert "DSD cycle 0: sparse phase. Pruned 1056/2112 weights (50.0%) in 2 tensors" in output
    assert "resumed in the sparse phase after 3 epochs" in output


def test_a_metric_given_on_rank_zero_only_moves_every_rank_alike_under_ddp(tmp_path):
    (tmp_path / "run").mkdir()
    ranks = run_worker(WORKER, tmp_path / "run", "--strategy", "ddp", "--convergence", ranks=2)
    # dense 1 epoch; sparse until the flat metric (rank 0's) has one check without improvement; re-dense 1.
    assert ranks[0]["phases"] == ranks[1]["phases"] == ["sparse", "sparse", "redense", "redense"]
    assert all(rank["finished"] for rank in ranks)
