"""Keeping pruned entries at exactly zero during a sparse phase.

:class:`SparseConstraint` owns the masks of one sparse phase, on the weights' device. By default they are
kept in the weights' dtype (on the CPU that runs at copy speed while stock bool kernels are 2-7x slower);
``storage="bool"`` keeps 1-byte masks instead. Either way a mask is a *keep* mask (1 or ``True`` where the
weight stays) applied with one fused ``torch._foreach_mul_``. For a sharded parameter (a ``DTensor`` under
FSDP2 or tensor parallelism) the mask covers this rank's shard only, and weights, gradients and optimizer
state are multiplied through ``to_local()``. It

* zeroes the pruned weights, their gradients and their optimizer state when it is attached;
* zeroes the gradients of pruned entries before every optimizer step (:meth:`mask_gradients`, called by
  a front door where its framework lets it act after backward and gradient unscaling and before gradient
  clipping, so clipping sees the sparse network's true gradient: ``DSDCallback`` from Lightning's
  ``on_before_optimizer_step``; ``DSDTrainerCallback`` also masks as backward computes them, since
  ``transformers.Trainer`` clips before any event; a step called otherwise, as in a plain loop, gets its
  gradients masked by a torch step pre-hook instead, and a step given a closure (LBFGS,
  ``step(closure)``) gets the closure wrapped so that every evaluation computes with the sparse weights and
  returns masked gradients);
* re-zeroes the pruned weights after every optimizer step through
  ``torch.optim.Optimizer.register_step_post_hook``, which fires once per real step whatever drives it
  (gradient accumulation, manual optimization, and not at all for steps an AMP scaler skips).

The second pass is skipped for the element-wise optimizers in :data:`ZERO_PRESERVING_OPTIMIZERS` when
:meth:`mask_gradients` or the step pre-hook masked the gradients of this very step: with zero weight, zero
gradient and zero state, their update of a pruned entry is exactly zero (weight decay, momentum, Nesterov,
AMSGrad included), so one masked pass per step is enough. Every other optimizer gets the post-step re-mask.

Examples:
    >>> import torch
    >>> weight = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
    >>> optimizer = torch.optim.SGD([weight], lr=1.0, momentum=0.9)
    >>> constraint = SparseConstraint({"w": weight}, {"w": torch.tensor([True, False, True])})
    >>> constraint.attach([optimizer])
    >>> weight.grad = torch.ones(3)
    >>> optimizer.step()
    >>> weight.data
    tensor([0., 0., 2.])
    >>> constraint.detach()
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from lightning_dsd.rules.sharding import local_part

MASK_STORAGES = ("weight_dtype", "bool")


@torch.no_grad()
def zero_pruned(tensors: list[Tensor], keep_masks: list[Tensor]) -> None:
    """Zero the pruned entries in place: multiply by keep masks (bool, or of the tensors' dtype), fused."""
    if tensors:  # a sparse phase that prunes nothing (every target frozen or in no optimizer) has none
        torch._foreach_mul_(tensors, keep_masks)


ZERO_PRESERVING_OPTIMIZERS: tuple[type[Optimizer], ...] = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.Adamax,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.RMSprop,
    torch.optim.Adagrad,
    torch.optim.Adadelta,
    torch.optim.ASGD,
    torch.optim.Rprop,
)


def _local_parts(params: list[Tensor]) -> list[Tensor]:
    # Looked up at every use, not kept: FSDP2 may swap the storage behind a sharded parameter.
    return [local_part(p) for p in params]


def unwrapped_optimizer(optimizer: Any) -> Any:
    """The torch optimizer behind Fabric's, Lightning's and accelerate's wrappers (which pass for its class,
    and hold it as ``.optimizer``): the one whose hooks fire whoever calls ``step``.

    Examples:
        >>> optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        >>> class Wrapper:
        ...     def __init__(self, optimizer): self.optimizer = optimizer
        >>> unwrapped_optimizer(Wrapper(optimizer)) is optimizer, unwrapped_optimizer(optimizer) is optimizer
        (True, True)
    """
    while isinstance(inner := getattr(optimizer, "optimizer", None), Optimizer) and inner is not optimizer:
        optimizer = inner
    return optimizer


def keeps_pruned_zeros(optimizer: Optimizer) -> bool:
    """Whether ``optimizer`` provably leaves an entry at zero when its weight, gradient and state are zero.

    Only the exact torch classes qualify: a subclass may change the update rule.
    """
    return type(optimizer) in ZERO_PRESERVING_OPTIMIZERS


@dataclass
class _OptimizerTargets:
    """The targeted parameters one optimizer owns, with their masks, in foreach-ready lists."""

    params: list[Tensor]
    masks: list[Tensor]
    keeps_zeros: bool
    gradients_masked: bool = False
    handles: list[RemovableHandle] = field(default_factory=list)


class SparseConstraint:
    """The masks of one sparse phase and the hooks that enforce them (see the module docstring)."""

    def __init__(
        self, params: Mapping[str, Tensor], keep: Mapping[str, Tensor], storage: str = "weight_dtype"
    ) -> None:
        self.names = list(keep)
        self.params = [params[name] for name in self.names]
        self.masks = [
            keep[name].to(device=p.device, dtype=torch.bool if storage == "bool" else p.dtype)
            for name, p in zip(self.names, self.params, strict=False)
        ]
        self._targets: dict[int, _OptimizerTargets] = {}

    def keep_masks(self) -> dict[str, Tensor]:
        """The masks as bool tensors (``True`` = kept), by parameter name."""
        return {name: mask.bool() for name, mask in zip(self.names, self.masks, strict=False)}

    def apply_to_weights(self) -> None:
        zero_pruned(_local_parts(self.params), self.masks)

    def attach(self, optimizers: Iterable[Optimizer]) -> None:
        """Zero pruned weights, gradients and optimizer state, then hook into every optimizer that owns a target."""
        self.apply_to_weights()
        index_of = {id(p): i for i, p in enumerate(self.params)}
        for optimizer in optimizers:
            owned = [index_of[id(p)] for group in optimizer.param_groups for p in group["params"] if id(p) in index_of]
            if not owned:
                continue
            targets = _OptimizerTargets(
                params=[self.params[i] for i in owned],
                masks=[self.masks[i] for i in owned],
                keeps_zeros=keeps_pruned_zeros(optimizer),
            )
            self._targets[id(optimizer)] = targets
            _mask_gradients_of(targets)
            _mask_optimizer_state(optimizer, targets)
            targets.handles.append(optimizer.register_step_pre_hook(self._before_step))
            targets.handles.append(optimizer.register_step_post_hook(self._after_step))

    def zero_optimizer_state(self, optimizers: Iterable[Optimizer]) -> tuple[list[str], list[str]]:
        """Zero the pruned entries' state in ``optimizers`` (at re-dense), so no momentum revives them. Return the
        names of the state entries zeroed at the pruned entries (those with one value per weight: momentum,
        ``exp_avg``, ``exp_avg_sq``) and of those kept as they were (any other shape: a step count, Adafactor's
        factored row and column moments, a scalar), each sorted.

        Examples:
            >>> w = torch.nn.Parameter(torch.ones(2))
            >>> adam = torch.optim.Adam([w], lr=0.1)
            >>> w.grad = torch.ones(2); adam.step()
            >>> constraint = SparseConstraint({"w": w}, {"w": torch.tensor([True, False])})
            >>> constraint.attach([adam])
            >>> constraint.zero_optimizer_state([adam]), adam.state[w]["exp_avg"].tolist()
            ((['exp_avg', 'exp_avg_sq'], ['step']), [0.10000000149011612, 0.0])
        """
        zeroed: set[str] = set()
        kept: set[str] = set()
        for optimizer in optimizers:
            targets = self._targets.get(id(optimizer))
            if targets is not None:
                entries = _mask_optimizer_state(optimizer, targets)
                zeroed |= entries[0]
                kept |= entries[1]
        return sorted(zeroed), sorted(kept)

    def detach(self) -> None:
        """Remove the hooks from every optimizer (the masks are kept)."""
        for targets in self._targets.values():
            for handle in targets.handles:
                handle.remove()
        self._targets.clear()

    def mask_gradients(self, optimizer: Any, already_masked: bool = False) -> None:
        """Zero the gradients of pruned entries of the parameters ``optimizer`` owns, before its step; with
        ``already_masked`` (a door whose gradient hooks masked them as backward computed them) only note that
        they are, so that the step pre-hook does not mask them again."""
        targets = self._targets.get(id(optimizer))
        if targets is not None:
            if not already_masked:
                _mask_gradients_of(targets)
            targets.gradients_masked = True

    def forget_masked_gradients(self) -> None:
        """Mark every optimizer's gradients as unmasked: a new batch brings new gradients, and a step the
        AMP scaler skipped must not leave a stale mark for the next one."""
        for targets in self._targets.values():
            targets.gradients_masked = False

    def _before_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> Optional[tuple[Any, Any]]:
        targets = self._targets[id(optimizer)]
        # args[0] is the optimizer itself; a closure, if any, is the callable after it or the keyword.
        position = next((i for i, arg in enumerate(args) if i and callable(arg)), None)
        closure = kwargs.get("closure") if position is None else args[position]
        if closure is None:
            # A step called after backward without Lightning's hook (a plain loop): mask the gradients here;
            # they are this step's, so they count as masked and the post-step pass can be skipped.
            if not targets.gradients_masked:
                _mask_gradients_of(targets)
                targets.gradients_masked = True
            return None
        # With a closure (Lightning's automatic optimization, LBFGS, `step(closure)`) this hook runs before the
        # closure's backward: wrap the closure so that every evaluation computes with the sparse weights (LBFGS
        # moves them between evaluations) and hands the optimizer masked gradients (unless Lightning's
        # on_before_optimizer_step, inside the closure, already masked them).
        evaluations = 0

        def sparse_closure() -> Any:
            nonlocal evaluations
            if evaluations:
                zero_pruned(_local_parts(targets.params), targets.masks)
            evaluations += 1
            loss = closure()
            if not targets.gradients_masked:
                _mask_gradients_of(targets)
                targets.gradients_masked = evaluations == 1
            return loss

        if position is None:
            return args, {**kwargs, "closure": sparse_closure}
        return (*args[:position], sparse_closure, *args[position + 1:]), kwargs

    @torch.no_grad()
    def _after_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        targets = self._targets[id(optimizer)]
        if not (targets.keeps_zeros and targets.gradients_masked):
            zero_pruned(_local_parts(targets.params), targets.masks)
        targets.gradients_masked = False


@torch.no_grad()
def _mask_gradients_of(targets: _OptimizerTargets) -> None:
    pairs = [(local_part(p.grad), m) for p, m in zip(targets.params, targets.masks, strict=False) if p.grad is not None]
    if pairs:
        grads, masks = zip(*pairs, strict=False)
        zero_pruned(list(grads), list(masks))


@torch.no_grad()
def _mask_optimizer_state(optimizer: Optimizer, targets: _OptimizerTargets) -> tuple[set[str], set[str]]:
    """Zero every per-entry state tensor (momentum, ``exp_avg``, ``exp_avg_sq``, ...) at pruned entries; return
    the names of the entries zeroed and of those left as they were (not shaped like their parameter)."""
    zeroed: set[str] = set()
    kept: set[str] = set()
    for param, mask in zip(targets.params, targets.masks, strict=False):
        for key, value in optimizer.state.get(param, {}).items():
            if isinstance(value, Tensor) and value.shape == param.shape:
                state = local_part(value)
                zero_pruned([state], [mask if mask.dtype in (torch.bool, state.dtype) else mask.to(state.dtype)])
                zeroed.add(str(key))
            else:
                kept.add(str(key))
    return zeroed, kept
