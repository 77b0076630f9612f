"""DSD on sharded models under ``ModelParallelStrategy``: FSDP2, tensor parallel and both on a 2-D mesh, in real
gloo processes on the CPU (``sharded_worker.py``). Masks are compared with the single-device functions on the
gathered weights; resumes are compared bit for bit with the uninterrupted run."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import run_worker
from sharded_worker import grad_weighted
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_dsd.rules.importance import obd_saliency
from lightning_dsd.rules.masks import NMPattern
from lightning_dsd.rules.plan import MaskPlan
from lightning_dsd.rules.redense import reinitialize_pruned

WORKER = Path(__file__).with_name("sharded_worker.py")
TARGETS = ["net.0.weight", "net.2.weight", "net.4.weight"]
SIZES = {"net.0.weight": 10 * 12, "net.2.weight": 7 * 10, "net.4.weight": 7}

pytestmark = pytest.mark.slow


def _run(out: Path, *args: str, ranks: int = 2) -> list[dict]:
    out.mkdir()
    return run_worker(WORKER, out, *args, ranks=ranks)


def _assert_dsd_held(ranks: list[dict], plan: MaskPlan, steps_per_phase: int, final: bool = False) -> None:
    """Same masks as one device on the gathered weights, zeros after every step, zeroed optimizer state; with
    ``final``, one more epoch in a final sparse phase whose masks are the one-device masks too."""
    expected = plan.decide(ranks[0]["dense_end"], cycle=0)
    for rank in ranks:
        assert [phase for phase, _ in rank["steps"]] == (
            ["dense"] * steps_per_phase + ["sparse"] * 2 * steps_per_phase + ["redense"] * steps_per_phase
            + ["sparse"] * steps_per_phase * final
        )
        assert all(zeros for _, zeros in rank["steps"]), "pruned entries are zero after every step on every rank"
        assert rank["state_zero"] == [True, True] + [True] * final, "optimizer state of pruned entries is zero"
        if final:
            final_expected = plan.decide(rank["redense_end"], cycle=0)  # the one-device mask, after re-dense
            assert sorted(rank["final_masks"]) == sorted(final_expected)
            for name, mask in final_expected.items():
                assert torch.equal(rank["final_masks"][name], mask), f"{name}: not the one-device final mask"
                assert bool((rank["final"][name][~mask] == 0).all()), f"{name}: the run ends sparse"
        assert sorted(rank["masks"]) == sorted(expected)
        for name in expected:
            assert torch.equal(rank["masks"][name], expected[name]), f"{name}: not the single-device mask"
            assert rank["local_masks"][name].shape == rank["local_shapes"][name], "each rank keeps its shard's mask"
        # StepLR(gamma=0.9) per epoch, and x0.1 at re-dense: the scheduler keeps the drop.
        assert [lr for (lr,) in rank["lrs"]] == pytest.approx([1e-2, 9e-3, 8.1e-3, 7.29e-4, 6.561e-4][:4 + final])


def _assert_forwards_compute_with_what_dsd_stored(ranks: list[dict], phases: set[str]) -> None:
    """Every forward pass, training and evaluation, on every rank, computed with the weights DSD stored (no
    stale gathered copy), pruned entries zero in sparse phases; and forwards were seen in ``phases``."""
    for rank in ranks:
        forwards = rank["forwards"]
        stale = [f for f in forwards if not f["same_as_stored"]]
        assert not stale, f"forward passes computed with stale gathered weights: {stale[:3]}"
        assert all(f["pruned_zero"] for f in forwards if f["phase"] == "sparse"), "a pruned entry was not zero"
        assert {f["phase"] for f in forwards if f["training"]} >= phases
        assert any(not f["training"] for f in forwards), "evaluation forwards were probed too"


def _assert_same_final_weights(uninterrupted: list[dict], resumed: list[dict]) -> None:
    for before, after in zip(uninterrupted, resumed, strict=True):
        assert set(before["final"]) == set(after["final"])
        for name, value in before["final"].items():
            assert torch.equal(value, after["final"][name]), f"{name} differs after the resume"


def test_fsdp2_uneven_shards_match_one_device_and_resume_bit_identically_from_a_sharded_checkpoint(tmp_path):
    full = _run(tmp_path / "full", "--layout", "fsdp", "--export-sparse")
    _assert_dsd_held(full, MaskPlan((0.5,)), steps_per_phase=2)
    exported = tmp_path / "full" / "tb" / "version_0" / "dsd_sparse"
    assert (exported / "cycle0.ckpt").is_dir(), "the strategy's own sharded checkpoint of the sparse model"
    sparse_state = torch.load(exported / "cycle0_sparse_state_dict.pt", weights_only=True)
    assert all(torch.equal(sparse_state[n].to_dense() != 0, full[0]["masks"][n]) for n in TARGETS)
    assert [rank["local_shapes"]["net.4.weight"] for rank in full] == [(1, 7), (0, 7)], "rank 1 holds no row"
    assert all(all(rank["sharded"].values()) for rank in full)

    events = glob.glob(str(tmp_path / "full" / "tb" / "version_0" / "events.out.tfevents.*"))
    assert len(events) == 1, "only rank zero writes TensorBoard events"
    accumulator = EventAccumulator(events[0], size_guidance={"histograms": 0, "scalars": 0})
    accumulator.Reload()
    for name, size in SIZES.items():  # histograms of the whole tensor, not of rank zero's shard
        (histogram,) = accumulator.Histograms(f"dsd_weights/{name}/2_after_pruning")
        assert histogram.histogram_value.num == size
    timeline = accumulator.Histograms("dsd_weights_timeline/net.4.weight")
    assert [h.histogram_value.num for h in timeline] == [7] * 4, "every epoch, the whole tensor"
    figures = sorted(path.name for path in (tmp_path / "full" / "tb" / "version_0" / "dsd_figures").iterdir())
    assert figures == ["cycle0_net.0.weight.png"], "one figure, of the largest layer, drawn by rank zero"
    sparsity = [event.value for event in accumulator.Scalars("dsd/sparsity")]
    assert sparsity[1] == pytest.approx(round(0.5 * 120) / 197 + round(0.5 * 70) / 197 + round(0.5 * 7) / 197)

    checkpoint = tmp_path / "full" / "ckpt" / "epoch=1.ckpt"  # mid-sparse, a folder of shards
    assert checkpoint.is_dir()
    meta = torch.load(checkpoint / "meta.pt", weights_only=True)
    assert sorted(meta["callbacks"]["DSDCallback"]["masks"]) == TARGETS, "full masks, 1 bit per weight"
    resumed = _run(tmp_path / "resumed", "--layout", "fsdp", "--resume", str(checkpoint))
    assert [phase for phase, _ in resumed[0]["steps"]] == ["sparse"] * 2 + ["redense"] * 2
    assert all(zeros for rank in resumed for _, zeros in rank["steps"])
    _assert_same_final_weights(full, resumed)

    one_process = _run(tmp_path / "one_process", "--layout", "fsdp", "--data-parallel", "1", "--resume",
                       str(checkpoint), ranks=1)[0]
    assert one_process["world_size"] == 1 and one_process["local_shapes"]["net.4.weight"] == (1, 7)
    assert all(torch.equal(one_process["masks"][n], full[0]["masks"][n]) for n in TARGETS), "re-sliced exactly"
    assert all(zeros for _, zeros in one_process["steps"])


@pytest.mark.parametrize(("layout", "importance"), [("fsdp", "obd"), ("fsdp", "callable"), ("tp", "obd")])
def test_sharded_masks_by_importance_equal_the_one_device_masks_from_the_gathered_statistics(tmp_path, layout,
                                                                                             importance):
    ranks = _run(tmp_path / importance, "--layout", layout, "--importance", importance, "--no-checkpoints")
    # the window is the dense epoch: each of its optimizer steps counted once (2 under FSDP2, whose ranks split
    # the batches, accumulated by 2; 4 under TP, whose ranks see the same batches)
    for rank in ranks:
        dense_steps = [phase for phase, _ in rank["steps"]].count("dense")
        assert dense_steps == (2 if layout == "fsdp" else 4)
        assert rank["window_steps"] == dict.fromkeys(TARGETS, dense_steps)
    score = obd_saliency if importance == "obd" else grad_weighted
    weights, grad_sq = ranks[0]["dense_end"], ranks[0]["grad_sq"]
    assert all(torch.equal(rank["grad_sq"][n], grad_sq[n]) for rank in ranks for n in TARGETS)
    expected = MaskPlan((0.5,)).decide(weights, 0, {n: score(n, w, grad_sq[n]) for n, w in weights.items()})
    assert not all(torch.equal(expected[n], MaskPlan((0.5,)).decide(weights, 0)[n]) for n in TARGETS), "criteria differ"
    for rank in ranks:
        for name in TARGETS:
            assert torch.equal(rank["masks"][name], expected[name]), f"{name}: not the one-device mask"
        assert all(zeros for _, zeros in rank["steps"])


def test_fsdp2_forwards_use_the_pruned_and_restarted_weights_with_gathered_copies_kept_between_steps(tmp_path):
    # reshard_after_forward=False keeps every module's gathered weights after the validation that precedes
    # each transition: without a reshard, the first step of each phase would compute with the old weights.
    # No checkpoints: their save happens to reshard (FSDP2's state-dict hook), which would hide a stale copy.
    ranks = _run(tmp_path / "run", "--layout", "fsdp", "--probe", "--validate", "epoch", "--keep-gathered",
                 "--redense-init", "small_normal", "--no-checkpoints")
    _assert_dsd_held(ranks, MaskPlan((0.5,)), steps_per_phase=2)
    _assert_forwards_compute_with_what_dsd_stored(ranks, {"dense", "sparse", "redense"})


def test_fsdp2_root_managed_layers_pruned_before_the_first_step_a_zero_initialised_layer_and_a_resume(tmp_path):
    # dense_epochs=0 (a pre-trained model): the sanity check gathers the root's weights (net.2, net.4), then
    # DSD prunes before the first step. net.4 starts at zero: it has no non-zero entry to show, and magnitude
    # cannot rank its entries, so it stays dense for the cycle (decided from shard-local ranges, nothing gathered;
    # its one row lives on rank 0, rank 1's shard is empty).
    options = ["--layout", "fsdp_root", "--probe", "--validate", "sanity", "--dense-epochs", "0",
               "--output-scale", "0"]
    ranks = _run(tmp_path / "full", *options)
    _assert_forwards_compute_with_what_dsd_stored(ranks, {"sparse", "redense"})
    first_sparse = [f for f in ranks[0]["forwards"] if f["training"] and f["step"] == 0]
    assert {f["name"] for f in first_sparse} == set(TARGETS), "the very first step, every layer probed"
    for rank in ranks:
        assert "net.4.weight" not in rank["masks"] and "net.2.weight" in rank["masks"]
        assert not any(f["masked"] for f in rank["forwards"] if f["name"] == "net.4.weight")

    (event_file,) = glob.glob(str(tmp_path / "full" / "tb" / "version_0" / "events.out.tfevents.*"))
    accumulator = EventAccumulator(event_file, size_guidance={"histograms": 0})
    accumulator.Reload()
    tags = set(accumulator.Tags()["histograms"])
    assert "dsd_weights/net.4.weight/2_after_pruning" in tags, "the all-zero tensor's histogram of every entry"
    assert "dsd_weights_nonzero/net.4.weight/2_after_pruning" not in tags, "no non-zero entry: skipped"
    assert "dsd_weights_nonzero/net.2.weight/2_after_pruning" in tags

    checkpoint = tmp_path / "full" / "ckpt" / "epoch=0.ckpt"  # mid-sparse: restored masks at train start
    resumed = _run(tmp_path / "resumed", *options, "--resume", str(checkpoint))
    _assert_forwards_compute_with_what_dsd_stored(resumed, {"sparse", "redense"})
    _assert_same_final_weights(ranks, resumed)


def test_fsdp2_global_threshold_bf16_small_normal_and_a_single_file_checkpoint(tmp_path):
    # net.4 at a thousandth of its init: the global threshold prunes it whole, and says so.
    options = ["--layout", "fsdp", "--scope", "global", "--precision", "bf16-mixed", "--redense-init",
               "small_normal", "--single-file", "--output-scale", "1e-3"]
    full = _run(tmp_path / "full", *options, "--export-sparse")
    _assert_dsd_held(full, MaskPlan((0.5,), scope="global"), steps_per_phase=2)
    assert not full[0]["masks"]["net.4.weight"].any(), "pruned whole"
    (event_file,) = glob.glob(str(tmp_path / "full" / "tb" / "version_0" / "events.out.tfevents.*"))
    accumulator = EventAccumulator(event_file, size_guidance={"histograms": 0, "tensors": 0})
    accumulator.Reload()
    (note,) = [e.tensor_proto.string_val[0].decode() for e in accumulator.Tensors("dsd/transitions/text_summary")
               if b"sparse phase" in e.tensor_proto.string_val[0]]
    assert "Pruned whole (every entry): net.4.weight." in note
    assert "dsd_weights_nonzero/net.4.weight/2_after_pruning" not in accumulator.Tags()["histograms"]
    exported = torch.load(tmp_path / "full" / "tb" / "version_0" / "dsd_sparse" / "cycle0_sparse_state_dict.pt",
                          weights_only=True)
    for name in TARGETS:  # whole tensors, as sparse tensors, pruned exactly as the masks say
        dense = exported[name].to_dense()
        assert dense.shape == full[0]["masks"][name].shape
        assert torch.equal(dense != 0, full[0]["masks"][name] & (full[0]["sparse_end"][name] != 0))
    restarted = {name: weight.clone() for name, weight in full[0]["sparse_end"].items()}
    reinitialize_pruned(restarted, full[0]["masks"], "small_normal", seed=0)  # the one-device function
    for rank in full:
        for name in TARGETS:
            assert torch.equal(rank["redense_start"][name], restarted[name]), f"{name}: not the one-device restart"

    checkpoint = tmp_path / "full" / "ckpt" / "epoch=1.ckpt"
    assert checkpoint.is_file()
    dsd_state = torch.load(checkpoint, weights_only=True)["callbacks"]["DSDCallback"]
    assert sorted(dsd_state["masks"]) == TARGETS
    resumed = _run(tmp_path / "resumed", *options, "--resume", str(checkpoint))
    _assert_same_final_weights(full, resumed)


def test_tensor_parallel_with_a_plain_layer_and_an_nm_pattern_resumes_bit_identically(tmp_path):
    full = _run(tmp_path / "full", "--layout", "tp", "--sparsity", "1:2")
    plan = MaskPlan((NMPattern(1, 2),), layer_sparsity={"net.4.*": 0.5})
    _assert_dsd_held(full, plan, steps_per_phase=4)  # data is not split under tensor parallel: 8 batches
    # The layers are built in configure_model, after DSD's `setup`: DSD finds them at `on_fit_start`.
    assert full[0]["sharded"] == {"net.0.weight": True, "net.2.weight": True, "net.4.weight": False}
    # Colwise splits the output dim, Rowwise the input dim: the 1:2 groups cross the shard boundary of net.2.
    assert [rank["local_shapes"]["net.2.weight"] for rank in full] == [(7, 5), (7, 5)]

    checkpoint = tmp_path / "full" / "ckpt" / "epoch=1.ckpt"
    resumed = _run(tmp_path / "resumed", "--layout", "tp", "--sparsity", "1:2", "--resume", str(checkpoint))
    _assert_same_final_weights(full, resumed)


def test_a_2d_mesh_of_fsdp2_over_tensor_parallel_prunes_one_global_threshold_exactly(tmp_path):
    # With a final sparse phase (the run ends sparse): its fresh masks are the one-device masks too.
    ranks = _run(tmp_path / "run", "--layout", "2d", "--scope", "global", "--probe", "--validate", "epoch",
                 "--keep-gathered", "--no-checkpoints", "--final-sparse", "1", ranks=4)
    _assert_dsd_held(ranks, MaskPlan((0.5,), scope="global"), steps_per_phase=2, final=True)
    _assert_forwards_compute_with_what_dsd_stored(ranks, {"dense", "sparse", "redense"})
    final_forwards = [f for rank in ranks for f in rank["forwards"] if f["step"] >= 8 and f["phase"] == "sparse"]
    assert final_forwards and all(f["pruned_zero"] for f in final_forwards), "zeros in the final phase's forwards"
    # Tensor parallel halves net.0's 10 rows, FSDP2 splits each half 3/2; net.4 sits on the data-parallel
    # mesh only, so each tensor-parallel rank holds a copy of its shards (counted once in the threshold).
    assert [rank["local_shapes"]["net.0.weight"] for rank in ranks] == [(3, 12), (3, 12), (2, 12), (2, 12)]
    assert [rank["local_shapes"]["net.4.weight"] for rank in ranks] == [(1, 7), (1, 7), (0, 7), (0, 7)]


def test_a_transformers_gpt2_under_fsdp2_prunes_its_tied_embedding_once_and_keeps_it_tied(tmp_path):
    ranks = _run(tmp_path / "run", "--layout", "gpt2", "--probe", "--validate", "epoch", "--no-checkpoints")
    _assert_dsd_held(ranks, MaskPlan((0.5,)), steps_per_phase=2)
    # The tied wte/lm_head sits in the root group, which stays gathered after each validation.
    _assert_forwards_compute_with_what_dsd_stored(ranks, {"dense", "sparse", "redense"})
    assert "model.transformer.wte.weight" in ranks[0]["masks"] and "model.lm_head.weight" not in ranks[0]["masks"]
    assert [rank["tied"] for rank in ranks] == [True, True], "the output layer is still the word embedding"
    assert all(rank["sharded"]["model.transformer.wte.weight"] for rank in ranks)


def test_the_readmes_sharded_example_runs_as_written(tmp_path):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    example = readme.split("## Sharded training", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    script = tmp_path / "sharded_dsd.py"
    script.write_text(example)
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, timeout=300, capture_output=True, text=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-5000:]
    assert "DSD cycle 0: sparse phase. Pruned 1056/2112 weights (50.0%) in 2 tensors" in output
    assert "DSD cycle 0: re-dense phase." in output
