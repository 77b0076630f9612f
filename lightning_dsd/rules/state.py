"""The DSD part of a checkpoint: written as plain data, read back only after it has been checked.

The state holds the schedule's position, the masks of a sparse phase (1 bit per weight), the configuration
that decided them (:class:`RunConfig`) and, while the gradient window of ``importance`` is open, its
statistics (``importance_window``: the steps counted and the float32 sum of squared gradients of each target,
4 bytes per weight; see :mod:`lightning_dsd.rules.importance`). It is made of tensors, numbers, strings, lists and
dicts only, so ``torch.load(..., weights_only=True)`` reads it.

:func:`decode_state` checks everything before anything is changed: a known format version (version 1,
which had no configuration, is migrated; a newer one is refused), schedule fields in range, a mask for
exactly each target the cycle prunes (every target but those it left dense, frozen or owned by no optimizer,
which the state lists) with the target's shape whose pruned count is what the configuration prescribes, and
a configuration that agrees with the resuming callback's on everything that already happened:

* may change: lengths of phases not yet finished (the current one included), ``lr_scale``, ``monitor``,
  ``mode``, ``patience``, ``min_delta``, ``redense_init``, ``redense_state``, ``seed``, ``mask_storage`` and
  everything about logging, and the phases after the current one (a final sparse phase added or dropped
  included): they only shape what is still to come;
* refused: ``prune`` (a DSD run and its LLR control are different runs; a checkpoint without it pruned),
  ``importance`` (the criterion that chooses the masks; a checkpoint without it ranked by magnitude),
  ``interval``, the targets (``include``, ``exclude``, ``layer_types``, the model), ``scope``, ``layer_sparsity``
  and the sparsity of a cycle that has started, the lengths of finished phases and the number of cycles up to
  the current one: they would change the current masks or rewrite the past.

Every failure is one :class:`CheckpointStateError` naming the entry, what was found and what was expected.

Examples:
    >>> import torch
    >>> config = RunConfig(stages=[["dense", 0, 1, 0.0], ["sparse", 0, 1, 0.5], ["redense", 0, 1, 0.5]],
    ...                    interval="epoch", scope="layer", layer_sparsity=None, targets=["w"])
    >>> state = encode_state({"index": 1, "started_at": 1, "converged": False}, {"w": torch.tensor([True, False])},
    ...                      config)
    >>> no_check = lambda masks, cycle, left_dense: None
    >>> schedule, masks, left_dense, window = decode_state(state, config, no_check, {"w": (2,)})
    >>> schedule["index"], masks["w"], left_dense
    (1, tensor([ True, False]), {})
    >>> decode_state({**state, "version": 99}, config, no_check, {"w": (2,)})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    lightning_dsd.rules.state.CheckpointStateError: ... `version` is 99, but ... reads versions 1 to 2. ...
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor
from typing_extensions import TypeGuard

from lightning_dsd.rules.masks import pack_mask, unpack_mask
from lightning_dsd.version import __version__

STATE_VERSION = 2
_FIRST_VERSION = 1
_SHOWN = Union[float, str]


class CheckpointStateError(ValueError):
    """A checkpoint's DSD state is damaged, or does not fit the callback that resumes from it."""

    def __init__(self, problem: str, advice: str = "") -> None:
        advice = advice or (
            "Resume with the DSD configuration and model the checkpoint was saved with, or start a new"
            " DSD run."
        )
        super().__init__(f"DSD cannot resume from this checkpoint: {problem}. {advice} The checkpoint"
                         " file is unchanged.")


@dataclass(frozen=True)
class RunConfig:
    """What decides the masks and the schedule: recorded in every checkpoint, compared on resume.

    ``stages`` lists ``[phase, cycle, length, sparsity]`` for every phase (length ``None``: until the
    metric converges; sparsity as written, a float or ``"N:M"``).
    """

    stages: list[list[Any]]
    interval: str
    scope: str
    layer_sparsity: Optional[dict[str, _SHOWN]]
    targets: list[str]
    prune: bool = True  # False: the LLR control arm, whose sparse phases hold no masks
    importance: str = "magnitude"  # the criterion that chooses the masks, by name (a callable's qualified name)

    def to_state(self) -> dict[str, Any]:
        """Plain data; ``prune`` is written only when False and ``importance`` only when it is not magnitude, so a
        DSD run's entry is what earlier versions wrote."""
        state = asdict(self)
        if self.prune:
            del state["prune"]
        if self.importance == "magnitude":
            del state["importance"]
        return state

    @classmethod
    def from_state(cls, state: Any) -> RunConfig:
        optional = {"prune", "importance"}  # a checkpoint without them pruned, by magnitude
        required = {f for f in cls.__dataclass_fields__} - optional
        if not isinstance(state, Mapping) or not required <= set(state) <= required | optional:
            raise CheckpointStateError(f"its `config` entry is {_brief(state)}, expected a mapping with the keys"
                                       f" {sorted(required)} (and `prune`, when False, `importance`, when not"
                                       " 'magnitude')")
        if not isinstance(state.get("prune", True), bool):
            raise CheckpointStateError(f"its `config.prune` is {_brief(state['prune'])}, expected a bool")
        if not isinstance(state.get("importance", "magnitude"), str):
            raise CheckpointStateError(f"its `config.importance` is {_brief(state['importance'])}, expected a str")
        return cls(**state)

    def differences(self, saved: RunConfig, index: int) -> list[str]:
        """What differs from ``saved`` that may not change once the run reached stage ``index``."""
        found = []
        for field in ("prune", "importance", "interval", "scope", "layer_sparsity", "targets"):
            if getattr(saved, field) != getattr(self, field):
                found.append(f"`{field}`: checkpoint {getattr(saved, field)!r}, this run {getattr(self, field)!r}")
        for i in range(index + 1):
            old, new = saved.stages[i], self.stages[i] if i < len(self.stages) else None
            phase, cycle = old[0], old[1]
            if new is None or new[:2] != old[:2]:
                found.append(f"stage {i}: checkpoint {phase} of cycle {cycle}, this run has"
                             f" {'no such stage' if new is None else f'{new[0]} of cycle {new[1]}'}")
                continue
            if old[3] != new[3] and phase == "sparse":
                found.append(f"sparsity of cycle {cycle}: checkpoint {old[3]!r}, this run {new[3]!r}")
            if i < index and old[2] != new[2]:
                found.append(f"length of the finished {phase} phase of cycle {cycle}: checkpoint {old[2]!r},"
                             f" this run {new[2]!r}")
        return found


def encode_state(
    schedule: Mapping[str, Any],
    masks: Mapping[str, Tensor],
    config: RunConfig,
    left_dense: Optional[Mapping[str, str]] = None,
    window: Optional[Mapping[str, Any]] = None,
) -> dict[str, Any]:
    """The checkpoint entry: plain data, masks packed at 1 bit per weight, the targets the current sparse
    phase left dense (name to reason) and, while it is open, the gradient window's statistics (``counts`` and
    full float32 ``sums`` by target)."""
    state = {
        "version": STATE_VERSION,
        "schedule": dict(schedule),
        "masks": {name: {"bits": pack_mask(mask), "shape": list(mask.shape)} for name, mask in masks.items()},
        "left_dense": dict(left_dense or {}),
        "config": config.to_state(),
    }
    if window is not None:
        state["importance_window"] = {"counts": dict(window["counts"]), "sums": dict(window["sums"])}
    return state


def decode_state(
    state: Any,
    config: RunConfig,
    check_masks: Callable[[Mapping[str, Tensor], int, Mapping[str, str]], None],
    shapes: Mapping[str, Sequence[int]],
) -> tuple[dict[str, Any], PackedMasks, dict[str, str], Optional[dict[str, Any]]]:
    """Check a checkpoint entry against the resuming callback; return its schedule state, its masks
    (unpacked as each is read), the targets its sparse phase left dense and the statistics of an open
    gradient window (``None`` when it holds none).

    ``check_masks(masks, cycle, left_dense)`` raises ``ValueError`` for masks that do not prune what the
    configuration prescribes for the targets not left dense (see
    :meth:`lightning_dsd.rules.plan.MaskPlan.check_masks`); ``shapes`` are the targets' shapes.
    """
    if not isinstance(state, Mapping):
        raise CheckpointStateError(f"its DSD state is {_brief(state)}, expected a mapping")
    version = state.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or not _FIRST_VERSION <= version <= STATE_VERSION:
        newer = isinstance(version, int) and version > STATE_VERSION
        raise CheckpointStateError(
            f"its DSD state `version` is {version!r}, but this lightning_dsd ({__version__}) reads versions"
            f" {_FIRST_VERSION} to {STATE_VERSION}",
            "Upgrade lightning_dsd to the version that wrote it." if newer else "",
        )
    saved = RunConfig.from_state(state.get("config")) if version >= 2 else None
    stages = saved.stages if saved is not None else config.stages
    schedule = _check_schedule(state.get("schedule"), len(stages))
    index = schedule["index"]
    if saved is None and not config.prune:
        raise CheckpointStateError("its DSD state (version 1) was written by a run that prunes, and this run is the"
                                   " LLR control (`prune=False`)", "Resume with `prune=True`, or start a new run.")
    if saved is not None and (differences := config.differences(saved, index)):
        raise CheckpointStateError(
            "its DSD configuration differs from this run's in what has already happened: "
            + "; ".join(differences),
            "Resume with the checkpoint's values for these (lengths of phases not yet finished, `lr_scale` and"
            " logging options may change).",
        )
    masks = _checked_masks(state.get("masks"), shapes)
    left_dense = _checked_left_dense(state.get("left_dense", {}), shapes)
    phase, cycle = stages[index][0], stages[index][1]
    if phase == "sparse" and not masks and not left_dense and config.prune:
        raise CheckpointStateError(f"it was saved in the sparse phase of cycle {cycle} but holds no masks")
    if not config.prune and (masks or left_dense):
        raise CheckpointStateError(f"it was saved by the LLR control (`prune=False`), which prunes nothing, but"
                                   f" holds masks for {sorted(masks) or sorted(left_dense)}")
    if phase != "sparse" and (masks or left_dense):
        raise CheckpointStateError(f"it was saved in the {phase} phase but holds masks for"
                                   f" {sorted(masks) or sorted(left_dense)}")
    if phase == "sparse" and config.prune:
        try:
            check_masks(masks, cycle, left_dense)
        except ValueError as error:
            raise CheckpointStateError(f"`masks`: {error}") from None
    window = _checked_window(state.get("importance_window"), shapes)
    if window is not None and (phase == "sparse" or not config.prune or config.importance == "magnitude"):
        raise CheckpointStateError(f"it holds the statistics of a gradient window, which only a run with"
                                   f" `importance` other than 'magnitude' keeps, before a sparse phase (this one is"
                                   f" in the {phase} phase, importance={config.importance!r})")
    return schedule, masks, left_dense, window


def _checked_window(window: Any, shapes: Mapping[str, Sequence[int]]) -> Optional[dict[str, Any]]:
    """The statistics of an open gradient window: step counts (ints >= 0) and float32 sums of each target's shape."""
    if window is None:
        return None
    counts = window.get("counts") if isinstance(window, Mapping) else None
    sums = window.get("sums") if isinstance(window, Mapping) else None
    if not (isinstance(counts, Mapping) and isinstance(sums, Mapping)):
        raise CheckpointStateError(f"its `importance_window` entry is {_brief(window)}, expected a mapping with"
                                   " `counts` and `sums`")
    valid = (set(sums) <= set(counts) <= set(shapes)
             and all(_is_int(c) and c >= 0 for c in counts.values())
             and all(isinstance(t, torch.Tensor) and t.dtype == torch.float32 and list(t.shape) == list(shapes[n])
                     for n, t in sums.items()))
    if not valid:
        raise CheckpointStateError(f"its `importance_window` entry is {_brief(window)}, expected `counts` (target name"
                                   " to an int >= 0) and `sums` (target name to a float32 tensor of its shape)")
    return {"counts": dict(counts), "sums": dict(sums)}


def _checked_left_dense(left_dense: Any, shapes: Mapping[str, Sequence[int]]) -> dict[str, str]:
    """The targets a sparse phase left dense, by name, with why: a mapping of target names to strings."""
    valid = isinstance(left_dense, Mapping) and all(
        isinstance(name, str) and name in shapes and isinstance(reason, str) for name, reason in left_dense.items()
    )
    if not valid:
        raise CheckpointStateError(f"its `left_dense` entry is {_brief(left_dense)}, expected a mapping from target"
                                   f" names ({_brief(sorted(shapes))}) to the reason each stayed dense")
    return dict(left_dense)


def _check_schedule(schedule: Any, n_stages: int) -> dict[str, Any]:
    if not isinstance(schedule, Mapping):
        raise CheckpointStateError(f"its `schedule` entry is {_brief(schedule)}, expected a mapping")
    checks = {
        "index": (lambda v: _is_int(v) and 0 <= v < n_stages, f"an int in 0..{n_stages - 1} (the schedule has"
                                                              f" {n_stages} phases)"),
        "started_at": (lambda v: _is_int(v) and v >= 0, "an int >= 0"),
        "converged": (lambda v: isinstance(v, bool), "a bool"),
    }
    for key, (valid, expected) in checks.items():
        if key not in schedule or not valid(schedule[key]):
            found = _brief(schedule.get(key, "missing"))
            raise CheckpointStateError(f"`schedule.{key}` is {found}, expected {expected}")
    tracker = schedule.get("tracker")
    if tracker is not None:
        best = tracker.get("best") if isinstance(tracker, Mapping) else None
        wait = tracker.get("wait") if isinstance(tracker, Mapping) else None
        if not (isinstance(best, float) and not math.isnan(best) and _is_int(wait) and wait >= 0):
            raise CheckpointStateError(f"`schedule.tracker` is {_brief(tracker)}, expected a float `best` and an"
                                       " int `wait` >= 0")
    return dict(schedule)


class PackedMasks(Mapping[str, Tensor]):
    """Checked packed masks, each unpacked to a bool tensor only when it is read, so a resume holds one full
    mask at a time (a sharded run keeps just its shard's part of each)."""

    def __init__(self, packed: Mapping[str, tuple[Tensor, list[int]]]) -> None:
        self._packed = dict(packed)

    def __getitem__(self, name: str) -> Tensor:
        bits, shape = self._packed[name]
        return unpack_mask(bits, shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._packed)

    def __len__(self) -> int:
        return len(self._packed)


def _checked_masks(masks: Any, shapes: Mapping[str, Sequence[int]]) -> PackedMasks:
    if not isinstance(masks, Mapping):
        raise CheckpointStateError(f"its `masks` entry is {_brief(masks)}, expected a mapping")
    checked = {}
    for name, entry in masks.items():
        shape = entry.get("shape") if isinstance(entry, Mapping) else None
        bits = entry.get("bits") if isinstance(entry, Mapping) else None
        if not (isinstance(shape, list) and all(_is_int(s) and s >= 0 for s in shape)):
            raise CheckpointStateError(f"`masks[{name!r}].shape` is {_brief(shape)}, expected a list of sizes")
        if name in shapes and list(shape) != list(shapes[name]):
            raise CheckpointStateError(f"`masks[{name!r}].shape` is {shape}, expected the weight's shape"
                                       f" {list(shapes[name])}")
        numel = math.prod(shape)
        if not (isinstance(bits, Tensor) and bits.dtype == torch.uint8 and bits.shape == ((numel + 7) // 8,)):
            raise CheckpointStateError(f"`masks[{name!r}].bits` is {_brief(bits)}, expected a uint8 tensor of"
                                       f" {(numel + 7) // 8} bytes (1 bit for each of {numel} weights)")
        checked[name] = (bits, shape)
    return PackedMasks(checked)


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _brief(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {list(value.shape)}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
