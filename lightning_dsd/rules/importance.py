r"""Which weights a sparse phase prunes: the criterion (``importance``) and the gradient statistics it reads.

The paper (Han et al., 2017, section 2.2) ranks weights by ``|w|``, a cheap stand-in for the loss's Taylor
expansion: near a minimum the first-order term vanishes and pruning ``w`` costs about
``ΔL ≈ ½ · ∂²L/∂w² · w²``. ``importance`` chooses the ranking:

* ``"magnitude"``: ``|w|``, the paper's (the default);
* ``"obd"``: Optimal Brain Damage's saliency ``½ · h · w²`` (LeCun et al., 1990), where ``h``, the Hessian's
  diagonal, is estimated by the empirical Fisher: the mean of each weight's squared gradient over the
  optimizer steps of a window just before the transition;
* a callable ``f(name, weight, grad_sq)`` returning a tensor of scores of ``weight``'s shape, where
  ``grad_sq`` is that mean squared gradient.

The lowest scores are pruned, with the same exactness as magnitudes (see :mod:`lightning_dsd.rules.masks`).

A :class:`GradientWindow` accumulates the squared gradients through an optimizer **step post-hook**
(``torch.optim.Optimizer.register_step_post_hook``): it fires once per real optimizer step, after gradient
accumulation, unscaling and clipping, and not for a step that AMP's ``GradScaler`` skipped, so one accumulated
gradient counts once. Under DDP the gradients it reads are already averaged over ranks, so the statistics
are identical on every rank; under FSDP2 / TP they are accumulated on each rank's shard. The hook exists only
while the window is open: outside it, nothing runs and nothing is held.

Examples:
    >>> import torch
    >>> weight = torch.nn.Parameter(torch.tensor([2.0, 0.5, -1.0]))
    >>> optimizer = torch.optim.SGD([weight], lr=0.0)
    >>> window = GradientWindow({"w": weight})
    >>> window.attach([optimizer])
    >>> for grad in ([0.0, 1.0, 1.0], [0.0, 3.0, 1.0]):
    ...     weight.grad = torch.tensor(grad)
    ...     optimizer.step()
    >>> window.counts, window.mean_squared("w")
    ({'w': 2}, tensor([0., 5., 1.]))
    >>> importance_scores("obd", {"w": weight}, window)["w"]  # ½ · h · w²: the large weight of zero gradient is least
    tensor([0.0000, 0.6250, 0.5000])
    >>> window.detach(); len(optimizer._optimizer_step_post_hooks)
    0
"""

from __future__ import annotations

import inspect
from functools import partial
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from lightning_dsd.rules.sharding import counts_over_ranks, full_tensor, local_part, local_slice

#: The named criteria; a callable ``f(name, weight, grad_sq) -> scores`` is the other choice.
IMPORTANCES = ("magnitude", "obd")
#: A user's criterion: the scores of ``weight`` (named ``name``) from it and its mean squared gradient.
ScoreFunction = Callable[[str, Tensor, Tensor], Tensor]
Importance = Union[str, ScoreFunction]


def check_importance(name: str, value: Any) -> Importance:
    """``value`` if it is one of :data:`IMPORTANCES` or a callable, else a ``ValueError`` saying so.

    Examples:
        >>> check_importance("importance", "obd")
        'obd'
        >>> check_importance("importance", "fisher")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: `importance` must be 'magnitude', 'obd' or a callable f(name, weight, grad_sq) ... Found: 'fisher'.
    """
    if value in IMPORTANCES:
        return value
    if callable(value) and not isinstance(value, (str, type)):
        try:
            signature = inspect.signature(value)
        except (TypeError, ValueError):  # a builtin without a signature: it is called as it is
            return value
        try:
            signature.bind("name", torch.zeros(1), torch.zeros(1))
        except TypeError as error:
            raise ValueError(f"`{name}` is called as f(name, weight, grad_sq), but {criterion_name(value)}"
                             f"{signature} cannot take those three arguments ({error}).") from None
        return value
    raise ValueError(
        f"`{name}` must be 'magnitude', 'obd' or a callable f(name, weight, grad_sq) that returns a tensor of scores"
        f" of `weight`'s shape (the lowest are pruned). Found: {value!r}."
    )


def criterion_name(importance: Importance) -> str:
    """The criterion as reports and checkpoints name it: ``"magnitude"``, ``"obd"``, or the callable's
    qualified name.

    Examples:
        >>> criterion_name("obd"), criterion_name(obd_saliency)
        ('obd', 'lightning_dsd.rules.importance.obd_saliency')
    """
    if isinstance(importance, str):
        return importance
    function = getattr(importance, "func", importance)  # a functools.partial names its function
    module = getattr(function, "__module__", None) or type(function).__module__
    qualname = getattr(function, "__qualname__", None) or type(function).__qualname__
    return f"{module}.{qualname}"


def obd_saliency(name: str, weight: Tensor, grad_sq: Tensor) -> Tensor:
    """Optimal Brain Damage's saliency ``½ · grad_sq · w²`` in float32 (``name`` is unused): what
    ``importance="obd"`` ranks by."""
    return 0.5 * grad_sq * weight.float().square()


class GradientWindow:
    """The sum of each target's squared gradient over optimizer steps, and the number of steps, while hooked.

    Args:
        targets: the weights, by name (plain tensors or ``DTensor`` shards).
        limit: stop counting after this many steps of a weight (the hooks are removed once every weight has
            them); ``None``: count every step until :meth:`detach`.

    The sums are float32 tensors of each weight's local shape (4 bytes per weight), made at the first step.
    """

    def __init__(self, targets: Mapping[str, nn.Parameter], limit: Optional[int] = None) -> None:
        self.targets = dict(targets)
        self.limit = limit
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {}
        self._handles: list[RemovableHandle] = []
        self._hooked: list[tuple[int, ...]] = []  # each hooked optimizer and its parameters, by id

    @property
    def is_full(self) -> bool:
        """Whether every target has counted ``limit`` steps."""
        return self.limit is not None and len(self.counts) == len(self.targets) and min(self.counts.values(),
                                                                                        default=0) >= self.limit

    @property
    def is_hooked(self) -> bool:
        return bool(self._handles)

    def attach(self, optimizers: Sequence[Optimizer]) -> None:
        """Count the steps of ``optimizers`` (each hooked once for the targets it updates); a no-op when these
        optimizers, with the same parameters (a param group added since, e.g. by ``BackboneFinetuning``, is
        hooked too), are hooked already, or the window is full."""
        owned = [(id(o), *(id(p) for group in o.param_groups for p in group["params"])) for o in optimizers]
        if self.is_full or owned == self._hooked:
            return
        self.detach()
        by_id = {id(p): name for name, p in self.targets.items()}
        for optimizer in optimizers:
            names = [by_id[id(p)] for group in optimizer.param_groups for p in group["params"] if id(p) in by_id]
            if names:
                self._handles.append(optimizer.register_step_post_hook(partial(self._after_step, names)))
        self._hooked = owned

    def detach(self) -> None:
        """Remove the hooks (the statistics are kept)."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._hooked = [], []

    @torch.no_grad()
    def _after_step(self, names: list[str], optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        for name in names:
            count = self.counts.get(name, 0)
            if self.limit is not None and count >= self.limit:
                continue
            param = self.targets[name]
            if name not in self.sums:
                self.sums[name] = torch.zeros(local_part(param).shape, dtype=torch.float32, device=param.device)
            if param.grad is not None:  # no gradient this step (unused weight): a zero gradient
                grad = local_part(param.grad).float()
                self.sums[name].addcmul_(grad, grad)
            self.counts[name] = count + 1
        if self.is_full:
            self.detach()

    def mean_squared(self, name: str, like: Optional[Tensor] = None) -> Tensor:
        """The mean squared gradient of ``name`` over the counted steps (zeros before any), as a ``DTensor``
        laid out like ``like`` when that is one, else this rank's local tensor."""
        param = self.targets[name]
        count = self.counts.get(name, 0)
        local = self.sums[name] / count if count else torch.zeros(local_part(param).shape, device=param.device)
        if isinstance(like, DTensor):
            return DTensor.from_local(local, like.device_mesh, like.placements, shape=like.shape, stride=like.stride())
        return local

    def state_dict(self) -> dict[str, Any]:
        """The counts and the full float32 sums on the CPU (a sharded weight's gathered from its shards, one
        at a time: a collective), so a resume on any mesh goes on where this one stopped."""
        sums = {name: full_tensor(_sharded_like(s, self.targets[name])).cpu() for name, s in self.sums.items()}
        return {"counts": dict(self.counts), "sums": sums}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take checked statistics (see :func:`~lightning_dsd.rules.state.decode_state`): this rank's part of each
        sum."""
        self.counts = {name: int(count) for name, count in state["counts"].items()}
        self.sums = {name: local_slice(full.to(self.targets[name].device), self.targets[name]).clone()
                     for name, full in state["sums"].items()}


def _sharded_like(local: Tensor, like: Tensor) -> Tensor:
    if isinstance(like, DTensor):
        return DTensor.from_local(local, like.device_mesh, like.placements, shape=like.shape, stride=like.stride())
    return local


@torch.no_grad()
def importance_scores(importance: Importance, weights: Mapping[str, Tensor], window: GradientWindow,
                      owner: str = "DSD") -> dict[str, Tensor]:
    """The scores of each of ``weights`` under ``importance`` (``"obd"`` or a callable), laid out like the
    weights (``DTensor``\\ s for sharded ones), checked: a tensor of the weight's shape, every entry finite.
    A collective when any weight is a ``DTensor``."""
    score = obd_saliency if importance == "obd" else importance
    assert callable(score)
    scores = {}
    for name, weight in weights.items():
        grad_sq = window.mean_squared(name, weight)
        # A user's function gets a copy: one that works in place (`w.abs_()`) must not change the model.
        result = score(name, weight.detach() if score is obd_saliency else weight.detach().clone(), grad_sq)
        if not isinstance(result, Tensor) or tuple(result.shape) != tuple(weight.shape) or (
                isinstance(weight, DTensor) != isinstance(result, DTensor)):
            shape = getattr(result, "shape", None)
            found = f"a {type(result).__name__}" + (f" of shape {tuple(shape)}" if shape is not None else "")
            raise ValueError(
                f"{owner}'s `importance={criterion_name(importance)}` returned {found} for `{name}`, expected a"
                f" tensor of the weight's shape {tuple(weight.shape)}"
                f"{' (a DTensor, as the sharded weight and grad_sq are)' if isinstance(weight, DTensor) else ''}."
                " Compute the scores elementwise from `weight` and `grad_sq`. Nothing was pruned."
            )
        scores[name] = result.detach().float()
    bad = counts_over_ranks(scores, lambda _, entries: (~torch.isfinite(entries)).sum()).tolist()
    listed = [f"`{name}`: {count}" for name, count in zip(scores, bad, strict=True) if count]
    if listed:
        raise ValueError(
            f"{owner}'s `importance={criterion_name(importance)}` gave NaN or infinite scores ({', '.join(listed)});"
            " DSD ranks finite scores only. Check the gradients of the window (a diverged run) or the function;"
            " to keep a weight whatever happens, give it a large finite score (e.g."
            " `torch.finfo(torch.float32).max`). Nothing was pruned."
        )
    return scores
