"""Which parameters DSD prunes.

By default: the weight matrices and kernels of Linear, Conv1d/2d/3d and their transposes, RNN/LSTM/GRU
(every ``weight_ih_l*``, ``weight_hh_l*`` and LSTM projection ``weight_hr_l*``), the input projections of
MultiheadAttention, and Embedding. Never biases or normalization parameters. ``include`` and ``exclude``
are glob patterns over the names ``model.named_parameters()`` gives; ``include`` replaces the default set
with every parameter of two or more dimensions that a pattern matches. Tied weights appear once, under
their first name, because ``named_parameters()`` removes duplicates.

Example:
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    >>> sorted(select_parameters(model).selected)
    ['0.weight', '3.weight']
    >>> sorted(select_parameters(model, exclude=["0.*"]).selected)
    ['3.weight']
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Optional, Sequence

from torch import nn

_WEIGHT_MODULES = (
    nn.Linear,
    nn.Bilinear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Embedding,
    nn.EmbeddingBag,
)
_RNN_WEIGHT_PREFIXES = ("weight_ih_l", "weight_hh_l", "weight_hr_l")
_ATTENTION_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


@dataclass
class Selection:
    """The parameters to prune, by name, and the frozen ones the default left alone."""

    selected: dict[str, nn.Parameter]
    skipped_frozen: list[str] = field(default_factory=list)


def default_prunable_ids(model: nn.Module) -> set[int]:
    """Identities of the parameters the default selection targets (weights of the supported layers)."""
    ids: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if _is_default_weight(module, name):
                ids.add(id(param))
    return ids


def _is_default_weight(module: nn.Module, name: str) -> bool:
    if isinstance(module, _WEIGHT_MODULES):
        return name == "weight"
    if isinstance(module, nn.RNNBase):
        return name.startswith(_RNN_WEIGHT_PREFIXES)
    if isinstance(module, nn.MultiheadAttention):
        return name in _ATTENTION_WEIGHTS
    return False


def matches_any(name: str, patterns: Sequence[str]) -> bool:
    """Whether ``name`` matches one of the glob ``patterns`` (case-sensitive, as parameter names are)."""
    return any(fnmatchcase(name, pattern) for pattern in patterns)


def select_parameters(
    model: nn.Module, include: Optional[Sequence[str]] = None, exclude: Optional[Sequence[str]] = None
) -> Selection:
    """Resolve ``include``/``exclude`` against ``model`` into the parameters to prune, in model order.

    Frozen parameters (``requires_grad=False``) are targeted only when an ``include`` pattern names them;
    otherwise they are reported in :attr:`Selection.skipped_frozen`.
    """
    defaults = default_prunable_ids(model)
    selected: dict[str, nn.Parameter] = {}
    skipped_frozen: list[str] = []
    for name, param in model.named_parameters():
        if include is None:
            wanted = id(param) in defaults
        else:
            wanted = param.dim() >= 2 and matches_any(name, include)
        if not wanted or (exclude and matches_any(name, exclude)):
            continue
        if include is None and not param.requires_grad:
            skipped_frozen.append(name)
            continue
        selected[name] = param
    return Selection(selected, skipped_frozen)
