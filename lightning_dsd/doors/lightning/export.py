"""Saving the model at the end of a sparse phase: a compressed model with the paper's "Sparse" accuracy.

Files go to ``<output directory>/dsd_sparse/`` (:func:`lightning_dsd.doors.lightning.output.output_directory`), and are
handed to MLflow and W&B loggers as the run's files (:func:`lightning_dsd.doors.lightning.output.hand_to_loggers`):
``cycle<c>.ckpt`` is a normal Lightning checkpoint (load its ``state_dict`` into the plain module; under
``ModelParallelStrategy`` it is whatever the strategy saves, a folder of shards by default); with
``sparse_tensors=True``, ``cycle<c>_sparse_state_dict.pt`` also holds the model's ``state_dict`` with every
pruned tensor as a torch sparse tensor (CSR for matrices, COO otherwise; ``tensor.to_dense()`` restores it).
Sparse formats store an index per kept weight, so they only get smaller than dense storage at high sparsity:
the sizes on disk are reported, whatever they are.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_dsd.doors.lightning.output import hand_to_loggers, output_directory
from lightning_dsd.rules import log
from lightning_dsd.rules.sharding import full_tensor


def to_sparse_tensor(tensor: Tensor) -> Tensor:
    """CSR for 2-D tensors, COO for the rest.

    Examples:
        >>> to_sparse_tensor(torch.tensor([[0.0, 1.0], [2.0, 0.0]])).layout
        torch.sparse_csr
    """
    return tensor.to_sparse_csr() if tensor.dim() == 2 else tensor.to_sparse()


def export_sparse_model(
    trainer: "pl.Trainer", targets: Mapping[str, Tensor], cycle: int, sparse_tensors: bool
) -> dict[str, Any]:
    """Save the current (sparse) model; return the paths and their sizes in bytes."""
    run_directory = trainer.strategy.broadcast(output_directory(trainer))
    directory = os.path.join(run_directory, "dsd_sparse")
    checkpoint = os.path.join(directory, f"cycle{cycle}.ckpt")
    trainer.save_checkpoint(checkpoint)  # collective under DDP: every rank calls it, rank zero writes
    exported: dict[str, Any] = {"cycle": cycle, "checkpoint": checkpoint}
    state = _full_state_dict(trainer, targets) if sparse_tensors else {}  # a collective for sharded weights
    if trainer.is_global_zero:
        exported["checkpoint_bytes"] = _size_on_disk(checkpoint)
        if sparse_tensors:
            path = os.path.join(directory, f"cycle{cycle}_sparse_state_dict.pt")
            torch.save(state, path)
            exported["sparse_state_dict"] = path
            exported["sparse_state_dict_bytes"] = os.path.getsize(path)
        sizes = ", ".join(
            f"{key.removesuffix('_bytes')} {size / 2**20:.2f} MiB"
            for key, size in exported.items()
            if key.endswith("_bytes")
        )
        log.info(f"DSD cycle {cycle}: saved the sparse model under {directory} ({sizes}).")
        for key in ("checkpoint", "sparse_state_dict"):
            if key in exported:
                hand_to_loggers(trainer, exported[key], run_directory)
    return exported


def _full_state_dict(trainer: "pl.Trainer", targets: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The model's ``state_dict`` on rank zero's CPU, targets as sparse tensors; sharded tensors are gathered
    one at a time, every rank taking part (other ranks get an empty dict)."""
    names = {id(p): name for name, p in trainer.lightning_module.named_parameters()}
    state = {}
    for key, value in trainer.lightning_module.state_dict(keep_vars=True).items():
        dense = full_tensor(value)
        if trainer.is_global_zero:
            dense = dense.cpu()
            state[key] = to_sparse_tensor(dense) if names.get(id(value)) in targets else dense
    return state


def _size_on_disk(path: str) -> int:
    """Bytes of a checkpoint file, or of a sharded checkpoint's folder (``ModelParallelStrategy``)."""
    if not os.path.isdir(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)
