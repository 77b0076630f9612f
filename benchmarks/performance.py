"""How much DSD costs, measured side by side in one process (these machines are noisy).

    python benchmarks/performance.py            # everything, CPU (and CUDA when a GPU is present)
    python benchmarks/performance.py --quick    # fewer rounds and sizes

Sections:

1. **Mask application**: the choices tried for the per-step masked pass (float vs bool masks, ``mul_`` vs
   ``masked_fill_`` vs ``where``, foreach vs a loop), against a plain ``copy_`` of the same tensors, the
   memory-bandwidth yardstick.
2. **Training step**, bare: the model's forward, backward and optimizer step alone, for plain training,
   DSD's sparse phase (the callback's constraint, and the ``DSD`` class of plain loops, whose step
   pre-hook masks the gradients) and ModelPruning's reparametrization, interleaved a few steps at a time.
   Then the same inside real ``lightning.Trainer`` runs on three workloads (MLP 3x1024, small CNN, LSTM;
   batch 64) for plain training, DSD in a dense phase, DSD in a sparse phase and Lightning's
   ``ModelPruning`` at the same sparsity, pruning the same parameters. Variants run in alternation, round
   after round; each ratio is the median over rounds of (variant step time / plain step time).
3. **Mask building** for 1M to 100M targeted parameters (per-layer and global thresholds).
4. **Growth**: the bare comparison as the MLP grows from 1M to 50M parameters.
5. **Memory**: bytes per targeted parameter kept during the sparse phase and in the checkpoint.
6. **Sharded**: FSDP2 over 2 gloo CPU processes, 25M targeted weights: sparse-phase step ÷ plain FSDP2 step,
   mask-build time at the transition, memory gathered then and masks held after
   (``python benchmarks/performance.py --sharded-only``).
7. **The global threshold's transition** on FSDP2 for 64 and 256 bf16 targets: seconds and the rise of
   resident memory while the masks are decided (``--global-only``; run it with ``PYTHONPATH`` set to another
   checkout to compare two versions side by side).
8. **transformers**: the sparse-phase step of a ``transformers.Trainer`` with ``DSDTrainerCallback`` ÷ the same
   Trainer's step without it (GPT-2 from a random-init config, AdamW, rounds in alternation, a second plain
   Trainer as the noise floor; ``--transformers-only``).
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import platform
import statistics
import time
import warnings
from typing import Callable, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelPruning
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_dsd import DSDCallback
from lightning_dsd.rules.constraint import SparseConstraint
from lightning_dsd.rules.masks import magnitude_masks, pack_mask
from lightning_dsd.rules.plan import MaskPlan
from lightning_dsd.rules.selection import select_parameters

warnings.filterwarnings("ignore")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], object], device: torch.device, repeat: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeat):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row) + " |")


# --------------------------------------------------------------------------- 1. mask application


def mask_application(device: torch.device, numel: int) -> None:
    generator = torch.Generator().manual_seed(0)
    shapes = [(1024, numel // (4 * 1024))] * 4
    weights = [torch.randn(s, generator=generator).to(device) for s in shapes]
    keep_bool = [(torch.rand(s, generator=generator) > 0.5).to(device) for s in shapes]
    keep_float = [m.float() for m in keep_bool]
    pruned_bool = [~m for m in keep_bool]
    scratch = [torch.empty_like(w) for w in weights]
    zero = torch.zeros((), device=device)
    total_bytes = sum(w.numel() * w.element_size() for w in weights)
    choices = {
        "copy_ (yardstick), foreach": lambda: torch._foreach_copy_(scratch, weights),
        "mul_ float mask, foreach": lambda: torch._foreach_mul_(weights, keep_float),
        "mul_ float mask, loop": lambda: [w.mul_(m) for w, m in zip(weights, keep_float, strict=False)],
        "mul_ bool mask, loop": lambda: [w.mul_(m) for w, m in zip(weights, keep_bool, strict=False)],
        "masked_fill_ bool mask, loop": lambda: [
            w.masked_fill_(m, 0.0) for w, m in zip(weights, pruned_bool, strict=True)
        ],
        "where(out=) bool mask, loop": lambda: [
            torch.where(m, w, zero, out=w) for w, m in zip(weights, keep_bool, strict=True)
        ],
    }
    times = {name: median_ms(fn, device) for name, fn in choices.items()}
    copy_ms = times["copy_ (yardstick), foreach"]
    rows = []
    for name, ms in times.items():
        mask_bytes = 0 if name.startswith("copy") else (4 if "float" in name else 1)
        rows.append((name, ms, f"{copy_ms / ms:.2f}", mask_bytes))
    table(
        f"Mask application on {device.type}: {sum(w.numel() for w in weights) / 1e6:.0f}M float32 weights"
        f" ({total_bytes / 2**20:.0f} MiB)",
        ["choice", "ms", "speed vs copy_", "mask bytes/param"],
        rows,
    )


# --------------------------------------------------------------------------- 2. training steps


def mlp(width: int = 1024, depth: int = 3, inputs: int = 784) -> nn.Module:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(inputs if i == 0 else width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(128 * 4 * 4, 256), nn.ReLU(), nn.Linear(256, 10),
    )


class LSTMClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(64, 256, num_layers=2, batch_first=True)
        self.head = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0][:, -1])


WORKLOADS = {
    "MLP 3x1024": (lambda: mlp(), (784,)),
    "small CNN": (small_cnn, (3, 32, 32)),
    "LSTM 2x256": (LSTMClassifier, (32, 64)),
}


class Module(pl.LightningModule):
    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.network(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


class BatchTimer(pl.Callback):
    """Wall time of every training batch (forward, backward, optimizer step and every callback hook)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.times = device, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        _sync(self.device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        _sync(self.device)
        self.times.append(time.perf_counter() - self._start)


def _dsd_targets(module: nn.Module) -> list[tuple[nn.Module, str]]:
    """The (module, parameter name) pairs DSD prunes by default, so ModelPruning prunes exactly the same."""
    targets = set(select_parameters(module).selected.values())
    return [(m, n) for m in module.modules() for n, p in m.named_parameters(recurse=False) if p in targets]


def _variant_callbacks(name: str, module: nn.Module) -> list[pl.Callback]:
    if name == "plain":
        return []
    if name == "DSD dense phase":
        return [DSDCallback(0.5, 10**6, 1, 1, log_histograms=False, log_scalars=False, figure_layers=0)]
    if name == "DSD sparse phase":
        return [DSDCallback(0.5, 0, 10**6, 1, log_histograms=False, log_scalars=False, figure_layers=0)]
    if name == "ModelPruning":
        # Prunes once, after the warm-up epoch; every later forward pays weight = weight_orig * weight_mask.
        return [ModelPruning("l1_unstructured", parameters_to_prune=_dsd_targets(module), amount=0.5,
                             apply_pruning=lambda epoch: epoch == 0, make_pruning_permanent=False, verbose=0)]
    raise ValueError(name)


VARIANTS = ("plain", "DSD dense phase", "DSD sparse phase", "ModelPruning")


def step_overheads(device: torch.device, rounds: int, steps: int, workloads: dict, batch: int = 64) -> dict:
    results = {}
    for workload, (build, shape) in workloads.items():
        x = torch.randn(batch * steps, *shape)
        y = torch.randint(0, 10, (batch * steps,))
        loader = DataLoader(TensorDataset(x, y), batch_size=batch)
        per_round: dict[str, list[float]] = {v: [] for v in VARIANTS}
        modules = {}
        for variant in VARIANTS:
            torch.manual_seed(0)
            modules[variant] = Module(build())
        for r in range(rounds):
            order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]
            for variant in order:
                timer = BatchTimer(device)
                trainer = pl.Trainer(
                    max_epochs=2, accelerator=device.type, devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False,
                    callbacks=[*_variant_callbacks(variant, modules[variant]), timer],
                )
                trainer.fit(modules[variant], loader)
                per_round[variant].append(statistics.median(timer.times[steps + 2:]))  # second epoch, warm
                for callback in trainer.callbacks:
                    if isinstance(callback, ModelPruning):  # ModelPruning left hooks: undo for the next round
                        callback.make_pruning_permanent(modules[variant])
        plain = per_round["plain"]
        results[workload] = {
            "plain ms": 1e3 * statistics.median(plain),
            **{v: statistics.median(t / p for t, p in zip(per_round[v], plain, strict=False)) for v in VARIANTS[1:]},
        }
    return results


def print_step_table(device: torch.device, results: dict) -> None:
    rows = []
    for workload, r in results.items():
        dsd_over = r["DSD sparse phase"] - 1
        mp_over = r["ModelPruning"] - 1
        ratio = f"{mp_over / dsd_over:.1f}" if dsd_over > 0 else "inf (DSD overhead <= 0)"
        rows.append((workload, r["plain ms"], f"{r['DSD dense phase']:.3f}", f"{r['DSD sparse phase']:.3f}",
                     f"{r['ModelPruning']:.3f}", ratio))
    table(
        f"Training step on {device.type}, batch 64, SGD momentum, sparsity 0.5 (median of per-round ratios to plain)",
        ["workload", "plain step ms", "DSD dense / plain", "DSD sparse / plain", "ModelPruning / plain",
         "ModelPruning overhead / DSD overhead"],
        rows,
    )


def bare_step_overheads(device: torch.device, repeats: int, workloads: dict, batch: int = 64) -> None:
    """The same comparison without Lightning around it: three copies of the model step in turn, a few
    steps each, many times over, so machine noise hits all of them alike. DSD's per-step work here is
    exactly the callback's (the gradient mask before the step, the re-mask after it if needed);
    ``torch.nn.utils.prune.l1_unstructured`` is what ModelPruning applies."""
    from torch.nn.utils import prune

    from lightning_dsd import DSD  # here, so that --global-only also runs against checkouts without it

    rows = []
    for workload, (build, shape) in workloads.items():
        x = torch.randn(batch, *shape, device=device)
        y = torch.randint(0, 10, (batch,), device=device)
        models, optimizers = {}, {}
        for variant in ("plain", "DSD sparse phase", "DSD plain loop, sparse", "ModelPruning"):
            torch.manual_seed(0)
            model = build().to(device)
            optimizers[variant] = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            targets = select_parameters(model).selected
            if variant == "DSD sparse phase":
                constraint = SparseConstraint(targets, magnitude_masks(targets, dict.fromkeys(targets, 0.5)))
                constraint.attach([optimizers[variant]])
            elif variant == "DSD plain loop, sparse":  # the DSD class, pruned before the first forward
                DSD(model, optimizers[variant], 0.5, 0, 10**9, 1, log_scalars=False, log_histograms=False)
            elif variant == "ModelPruning":
                for module, name in _dsd_targets(model):
                    prune.l1_unstructured(module, name, amount=0.5)
            models[variant] = model

        def step(variant: str) -> None:
            optimizers[variant].zero_grad()
            nn.functional.cross_entropy(models[variant](x), y).backward()
            if variant == "DSD sparse phase":
                constraint.mask_gradients(optimizers[variant])  # what on_before_optimizer_step does
            optimizers[variant].step()

        times: dict[str, list[float]] = {v: [] for v in models}
        for _ in range(repeats):
            for variant in models:
                for i in range(4):
                    _sync(device)
                    start = time.perf_counter()
                    step(variant)
                    _sync(device)
                    if i:  # the first step after a switch warms caches for this copy
                        times[variant].append(time.perf_counter() - start)
        plain = statistics.median(times["plain"])
        dsd = statistics.median(times["DSD sparse phase"]) / plain
        loop = statistics.median(times["DSD plain loop, sparse"]) / plain
        pruning = statistics.median(times["ModelPruning"]) / plain
        ratio = f"{(pruning - 1) / (dsd - 1):.1f}" if dsd > 1 else "inf (DSD overhead <= 0)"
        rows.append((workload, 1e3 * plain, f"{dsd:.3f}", f"{loop:.3f}", f"{pruning:.3f}", ratio))
    table(
        f"Bare training step on {device.type}, batch 64, SGD momentum, sparsity 0.5 (medians over {repeats}x3 steps)",
        ["workload", "plain step ms", "DSD sparse / plain", "DSD plain loop sparse / plain", "ModelPruning / plain",
         "ModelPruning overhead / DSD overhead"],
        rows,
    )


# --------------------------------------------------------------------------- 3. mask building


def mask_building(device: torch.device, sizes_m: Sequence[int]) -> None:
    rows = []
    for size in sizes_m:
        numel = size * 1_000_000
        layer = 2_500_000  # ResNet-50's largest tensors hold about 2.4M weights
        generator = torch.Generator().manual_seed(0)
        weights = {f"w{i}": torch.randn(min(layer, numel - start), generator=generator).to(device)
                   for i, start in enumerate(range(0, numel, layer))}
        sparsities = dict.fromkeys(weights, 0.5)
        layer_ms = median_ms(lambda: magnitude_masks(weights, sparsities), device, repeat=3)
        global_ms = median_ms(lambda: MaskPlan((0.5,), scope="global").decide(weights, 0), device, repeat=3)
        rows.append((f"{size}M", len(weights), layer_ms / 1e3, global_ms / 1e3))
        del weights
        gc.collect()
    table(f"Mask building on {device.type} (tensors of 2.5M weights, sparsity 0.5)",
          ["targeted params", "tensors", "per-layer s", "global s"], rows)


# --------------------------------------------------------------------------- 4. growth, 5. memory


def growth(device: torch.device, repeats: int) -> None:
    widths = {"1M": 512, "5M": 1200, "20M": 2500, "50M": 4000}
    workloads = {f"MLP {label} (width {w})": ((lambda w=w: mlp(width=w)), (784,)) for label, w in widths.items()}
    print("\nGrowth: the same bare comparison as the MLP grows from 1M to 50M parameters.")
    bare_step_overheads(device, repeats, workloads)


def memory() -> None:
    network = mlp()
    params = {n: p for n, p in network.named_parameters() if n.endswith("weight")}
    keep = magnitude_masks(params, dict.fromkeys(params, 0.5))
    targeted = sum(p.numel() for p in params.values())

    def live_bytes(storage: str) -> float:
        masks = SparseConstraint(params, keep, storage).masks
        return sum(m.numel() * m.element_size() for m in masks) / targeted

    packed = sum(pack_mask(m).numel() for m in keep.values())
    table("Memory per targeted float32 parameter (MLP 3x1024)", ["what", "bytes/param"], [
        ("DSD masks during a sparse phase (default mask_storage='weight_dtype')", live_bytes("weight_dtype")),
        ("DSD masks during a sparse phase, mask_storage='bool'", live_bytes("bool")),
        ("DSD masks outside sparse phases", 0.0),
        ("DSD masks in the checkpoint (packed bits)", packed / targeted),
        ("ModelPruning: weight_orig + float weight_mask, all training long", 8.0),
    ])


# --------------------------------------------------------------------------- 6. sharded (FSDP2)

SHARDED_OPTIMIZERS = {"AdamW fused": {"fused": True}, "AdamW (torch's CPU default, for-loop)": {}}


def sharded(processes: int = 2, width: int = 2500, depth: int = 4, rounds: int = 8, steps: int = 3) -> None:
    """FSDP2 over ``processes`` gloo CPU processes on an MLP of ``depth`` square ``width`` layers (4 x 2500:
    25M targeted weights): step time with DSD's sparse-phase constraint ÷ plain FSDP2 step time (each round
    runs ``steps`` plain, sparse, then plain steps; the ratio is the median over rounds of sparse ÷ the mean
    of the two plain medians), mask-build time at the transition and memory; for fused AdamW and for the
    for-loop AdamW torch uses on the CPU by default."""
    import torch.multiprocessing as mp

    rows: dict[str, list[object]] = {}
    for optimizer_options in SHARDED_OPTIMIZERS.values():
        results = mp.get_context("spawn").SimpleQueue()
        mp.spawn(_sharded_rank, args=(processes, width, depth, rounds, steps, optimizer_options, results),
                 nprocs=processes, join=True)
        by_rank = sorted((results.get() for _ in range(processes)), key=lambda r: r["rank"])
        measures = {
            "plain FSDP2 step (ms)": "plain_ms",
            "sparse-phase step ÷ plain step": "ratio",
            "control: second plain step ÷ first (the noise floor)": "control",
            "mask build, scope='layer' (s)": "build_layer_s",
            "mask build, scope='global' (s)": "build_global_s",
            "largest tensor gathered at the transition (MiB)": "gathered_mib",
            "peak RSS rise during the transition (MiB)": "transition_rss_mib",
            "masks held in the sparse phase (MiB)": "mask_mib",
            "local targeted weights (MiB)": "local_weights_mib",
        }
        for label, key in measures.items():
            rows.setdefault(label, [label]).extend(r[key] for r in by_rank)
    header = ["measure", *[f"{name}, rank {rank}" for name in SHARDED_OPTIMIZERS for rank in range(processes)]]
    table(
        f"Sharded: FSDP2 over {processes} CPU processes (gloo, 1 thread each), {depth} x {width}x{width} Linear"
        f" ({depth * width * width / 1e6:.0f}M targeted weights), batch 64, sparsity 0.5; median of {rounds} rounds",
        header,
        list(rows.values()),
    )
    zeros, positive = torch.zeros(3_000_000), torch.rand(3_000_000) + 0.5
    sqrt_ratio = median_ms(zeros.sqrt, torch.device("cpu")) / median_ms(positive.sqrt, torch.device("cpu"))
    print(f"\ntorch.sqrt on 3M exact zeros ÷ on 3M positive floats, this CPU: {sqrt_ratio:.1f}x (the for-loop AdamW"
          " takes the square root of exp_avg_sq, which DSD zeroes at pruned entries)")


def global_threshold(processes: int = 2, counts: Sequence[int] = (64, 256), width: int = 256, repeat: int = 3) -> None:
    """The ``scope="global"`` transition on FSDP2 over ``processes`` gloo CPU processes, for models of ``counts``
    bf16 ``width`` x ``width`` Linear targets: seconds to decide the masks (median of ``repeat``) and the rise
    of resident memory during the call (sampled every millisecond), per rank. Run it on two checkouts to
    compare them (``PYTHONPATH=<checkout> python benchmarks/performance.py --global-only``)."""
    import torch.multiprocessing as mp

    import lightning_dsd

    # Every allocation of 128 KiB or more gets its own mapping, returned to the system when freed, so resident
    # memory follows the live tensors instead of the allocator's reuse of earlier frees.
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    rows = []
    for count in counts:
        results = mp.get_context("spawn").SimpleQueue()
        mp.spawn(_global_threshold_rank, args=(processes, count, width, repeat, results), nprocs=processes, join=True)
        by_rank = sorted((results.get() for _ in range(processes)), key=lambda r: r["rank"])
        rows.append((count, f"{count * width * width / 1e6:.1f}M", *[f"{r['seconds']:.3f}" for r in by_rank],
                     *[f"{r['rss_rise_mib']:.1f}" for r in by_rank], f"{by_rank[0]['local_mib']:.1f}"))
    table(
        f"scope='global' transition, FSDP2 over {processes} CPU processes (gloo), bf16 {width}x{width} Linear targets;"
        f" lightning_dsd from {os.path.dirname(lightning_dsd.__file__)}",
        ["targets", "weights", *[f"seconds, rank {r}" for r in range(processes)],
         *[f"RSS rise MiB, rank {r}" for r in range(processes)], "local bf16 weights MiB"],
        rows,
    )


def _global_threshold_rank(rank: int, processes: int, count: int, width: int, repeat: int, results) -> None:
    import threading

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lightning_dsd.rules.sharding import local_part

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29518")
    dist.init_process_group("gloo", rank=rank, world_size=processes)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    mesh = init_device_mesh("cpu", (processes,))
    model = nn.Sequential(*[nn.Linear(width, width, bias=False, dtype=torch.bfloat16) for _ in range(count)])
    for layer in model:
        fully_shard(layer, mesh=mesh)
    targets = {f"{i}.weight": layer.weight for i, layer in enumerate(model)}
    gc.collect()

    def rss_mib() -> float:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    times, rises = [], []
    for _ in range(repeat):
        dist.barrier()
        baseline, peak, done = rss_mib(), [0.0], threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], rss_mib())
                time.sleep(0.001)

        sampler = threading.Thread(target=sample)
        sampler.start()
        start = time.perf_counter()
        masks = MaskPlan((0.5,), scope="global").decide(targets, cycle=0)
        times.append(time.perf_counter() - start)
        done.set()
        sampler.join()
        rises.append(max(peak[0], rss_mib()) - baseline)
        del masks
        gc.collect()
    results.put({
        "rank": rank,
        "seconds": statistics.median(times),
        "rss_rise_mib": statistics.median(rises),
        "local_mib": sum(local_part(w).numel() * w.element_size() for w in targets.values()) / 2**20,
    })
    dist.destroy_process_group()


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _sharded_rank(
    rank: int, processes: int, width: int, depth: int, rounds: int, steps: int, optimizer_options: dict, results
) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lightning_dsd.rules.sharding import local_part

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29517")
    dist.init_process_group("gloo", rank=rank, world_size=processes)
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)  # as in main(): spawned processes do not inherit it
    torch.manual_seed(rank)
    layers = [nn.Linear(width, width) for _ in range(depth)]
    model = nn.Sequential(*[module for layer in layers for module in (layer, nn.ReLU())][:-1])
    mesh = init_device_mesh("cpu", (processes,))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    targets = {f"{2 * i}.weight": layer.weight for i, layer in enumerate(layers)}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, **optimizer_options)
    x, y = torch.randn(64, width), torch.randn(64, width)

    def step(constraint: SparseConstraint | None) -> float:
        start = time.perf_counter()
        nn.functional.mse_loss(model(x), y).backward()
        if constraint is not None:
            constraint.mask_gradients(optimizer)  # what DSD's on_before_optimizer_step does
        optimizer.step()
        optimizer.zero_grad()
        return time.perf_counter() - start

    for _ in range(2):
        step(None)
    dist.barrier()
    rss_before = _peak_rss_mib()
    start = time.perf_counter()
    masks = MaskPlan((0.5,)).decide(targets, cycle=0)
    build_layer = time.perf_counter() - start
    transition_rss = _peak_rss_mib() - rss_before
    dist.barrier()
    start = time.perf_counter()
    MaskPlan((0.5,), scope="global").decide(targets, cycle=0)
    build_global = time.perf_counter() - start
    ratios, plain_times, control = [], [], []
    for _ in range(rounds):  # plain, sparse, plain: the mean of the two plain runs cancels a linear drift
        before = statistics.median(step(None) for _ in range(steps))
        constraint = SparseConstraint(targets, masks)
        constraint.attach([optimizer])
        sparse = statistics.median(step(constraint) for _ in range(steps))
        constraint.detach()
        after = statistics.median(step(None) for _ in range(steps))
        ratios.append(sparse / ((before + after) / 2))
        control.append(after / before)
        plain_times.append((before + after) / 2)
    mib = 2**20
    results.put({
        "rank": rank,
        "plain_ms": 1e3 * statistics.median(plain_times),
        "ratio": statistics.median(ratios),
        "control": statistics.median(control),
        "build_layer_s": build_layer,
        "build_global_s": build_global,
        "gathered_mib": max(w.numel() for w in targets.values()) * 4 / mib,
        "transition_rss_mib": transition_rss,
        "mask_mib": sum(m.numel() * m.element_size() for m in constraint.masks) / mib,
        "local_weights_mib": sum(local_part(w).numel() * w.element_size() for w in targets.values()) / mib,
    })
    dist.destroy_process_group()


# --------------------------------------------------------------------------- 8. transformers.Trainer


def transformers_trainer(rounds: int = 5, steps: int = 14, layers: int = 4, width: int = 256, batch: int = 8) -> None:
    """Sparse-phase step of a ``transformers.Trainer`` with ``DSDTrainerCallback`` (pruned before the first step,
    every step sparse) ÷ the step of the same Trainer without it; a second plain Trainer is the control. Each
    round runs the three Trainers in turn (order alternating), each for ``steps`` optimizer steps on the same
    data from the same initial weights; a step is timed from ``on_step_begin`` to ``on_step_end`` (forward,
    backward, clipping, optimizer and scheduler step, every callback) and the first 4 are dropped."""
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments
    from transformers.utils import logging as transformers_logging

    from lightning_dsd.huggingface import DSDTrainerCallback

    transformers_logging.set_verbosity_error()

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self._start)

    config = GPT2Config(n_layer=layers, n_embd=width, n_head=4, vocab_size=2048, n_positions=64, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    ids = torch.randint(0, config.vocab_size, (batch * steps, 64), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row} for row in ids]
    variants = ("plain", "DSD sparse phase", "plain (control)")
    medians: dict[str, list[float]] = {v: [] for v in variants}
    fastest: dict[str, list[float]] = {v: [] for v in variants}  # least disturbed by other processes
    targeted = 0
    for r in range(rounds):
        for variant in variants if r % 2 == 0 else variants[::-1]:
            torch.manual_seed(0)
            model = GPT2LMHeadModel(config)
            timer = StepTimer()
            callbacks: list = [timer]
            if variant == "DSD sparse phase":
                dsd = DSDTrainerCallback(0.5, 0, 10**6, 1, interval="step", log_histograms=False, log_scalars=False,
                                         figure_layers=0)
                callbacks.append(dsd)
            args = TrainingArguments(output_dir="/tmp/dsd_benchmark_transformers", max_steps=steps,
                                     per_device_train_batch_size=batch, use_cpu=True, report_to="none",
                                     save_strategy="no", disable_tqdm=True, max_grad_norm=1.0, logging_steps=10**6)
            Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks).train()
            if variant == "DSD sparse phase":
                targeted = sum(model.get_parameter(n).numel() for n in dsd.target_names)
            medians[variant].append(statistics.median(timer.times[4:]))
            fastest[variant].append(min(timer.times[4:]))

    def ratios(times: dict[str, list[float]], variant: str) -> list[float]:
        return [t / p for t, p in zip(times[variant], times["plain"], strict=True)]

    rows = [("plain Trainer step, median (ms)", 1e3 * statistics.median(medians["plain"]))]
    for label, times in (("median step", medians), ("fastest step", fastest)):
        rows += [
            (f"DSD sparse-phase ÷ plain, {label}", statistics.median(ratios(times, "DSD sparse phase"))),
            (f"control: second plain ÷ plain, {label} (the noise floor)",
             statistics.median(ratios(times, "plain (control)"))),
            (f"per-round DSD ÷ plain, {label}", ", ".join(f"{x:.3f}" for x in ratios(times, "DSD sparse phase"))),
        ]
    table(
        f"transformers.Trainer: GPT-2 {layers} layers x {width} ({targeted / 1e6:.1f}M targeted weights), batch"
        f" {batch} x 64 tokens, AdamW, max_grad_norm=1, sparsity 0.5; median of {rounds} rounds x"
        f" {steps - 4} timed steps",
        ["measure", "value"],
        rows,
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds and sizes")
    parser.add_argument("--device", action="append", help="cpu and/or cuda (default: cpu, plus cuda if present)")
    parser.add_argument("--sharded-only", action="store_true", help="only section 6, FSDP2 over 2 CPU processes")
    parser.add_argument("--global-only", action="store_true", help="only section 7, the global threshold's transition")
    parser.add_argument("--transformers-only", action="store_true",
                        help="only section 8, a transformers.Trainer with and without DSDTrainerCallback")
    args = parser.parse_args(argv)
    if args.transformers_only:
        torch.set_flush_denormal(True)  # AdamW's exp_avg_sq of rarely seen tokens goes denormal: a slow CPU path
        print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads")
        transformers_trainer(**({"rounds": 3, "layers": 2, "width": 128} if args.quick else {}))
        return
    if args.global_only:
        global_threshold(repeat=2 if args.quick else 3)
        return
    if args.sharded_only:
        sharded(rounds=3 if args.quick else 8)
        return
    torch.set_flush_denormal(True)  # the variants' weights drift apart; keep denormal slow paths out of it
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    print(f"torch {torch.__version__}, lightning {pl.__version__}, {platform.processor() or platform.machine()},"
          f" {os.cpu_count()} CPUs, {torch.get_num_threads()} threads"
          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
    for name in devices:
        device = torch.device(name)
        mask_application(device, 4_000_000 if args.quick else 16_000_000)
        bare_step_overheads(device, repeats=10 if args.quick else 60, workloads=WORKLOADS)
        print_step_table(device, step_overheads(device, rounds=3 if args.quick else 9, steps=10, workloads=WORKLOADS))
        mask_building(device, [1, 10] if args.quick else [1, 10, 25, 50, 100])
        growth(device, repeats=5 if args.quick else 15)
    memory()
    sharded(rounds=3 if args.quick else 8)
    global_threshold(repeat=2 if args.quick else 3)
    transformers_trainer(**({"rounds": 3, "layers": 2, "width": 128} if args.quick else {}))


if __name__ == "__main__":
    main()
