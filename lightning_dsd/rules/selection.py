"""Which parameters DSD prunes, and how each one's weight is laid out.

**Default targets are the connections of the network**: the weights that multiply activations. That is
the ``weight`` of ``Linear`` (and every subclass), ``Bilinear``, ``Conv1d/2d/3d`` and their transposes,
every ``weight_ih_l*``, ``weight_hh_l*`` and ``weight_hr_l*`` of RNN/LSTM/GRU, the input projections of
``MultiheadAttention`` (its output projection is a ``Linear``), and linear layers with other layouts that
are recognised by class name without importing their library: Hugging Face ``transformers``' ``Conv1D``
(GPT-2's attention and MLP matrices, stored ``(in, out)``). Never biases, normalization parameters, or
bare parameters such as position embeddings and class tokens.

**Embeddings are left dense by default.** An embedding is a lookup table, not a connection: a row
belongs to one token (or one position, one token type) and gets a gradient only when that token occurs,
so its magnitude measures frequency more than importance, and magnitude pruning would empty the rows
of rare tokens. A word embedding *tied* to an output layer (GPT-2's ``wte`` and ``lm_head``) is pruned,
because it is that layer's weight; it is pruned once and stays tied. Name embeddings in ``include`` to
prune them anyway.

**The convolution that reads the network's input is left dense by default**, as in the paper ("the very
first layer in convolutional networks is not pruned", it is very sensitive): a ResNet's ``conv1``, a ViT's
patch projection. Which one that is comes from the model's structure, without running it: the first module in
registration order (``model.modules()``, the order ``__init__`` assigns them) that holds a default target, when
it is a ``Conv2d`` or ``Conv3d`` (a subclass included), the convolutions of image and video networks. A model
whose first such module is a ``Linear``, an RNN, transformers' ``Conv1D`` or a ``Conv1d`` has none: a ``Conv1d``
most often reads an embedding's output, not the data (an embedding holds no default target, so registration
order cannot tell), so ``exclude`` a ``Conv1d`` that reads a raw signal if you want it dense. The summary names
the convolution left dense; ``include`` patterns that match it bring it back (``include`` replaces the default
set, e.g. ``include=["*.weight"]`` for a CNN, whose norms' weights are 1-D).

``include`` and ``exclude`` are glob patterns over the names ``model.named_parameters()`` gives;
``include`` replaces the default set with every parameter of two or more dimensions that a pattern
matches. Tied weights appear once, under their first name, as ``named_parameters()`` gives them.

Every target has a known **input dimension**, the one a weight is summed over: dim 1 for PyTorch's
``(out, in, *kernel)`` layouts and embeddings, dim 0 for transposed convolutions ``(in, out, *kernel)``
and ``Conv1D``. N:M patterns group weights along it. A model with its own linear-like module declares
it with :class:`LayerSpec` (see ``DSDCallback(layer_types=...)``).

Examples:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.Flatten(), nn.Linear(4, 2))
    >>> selection = select_parameters(model)  # the first convolution reads the input: left dense
    >>> sorted(selection.selected), selection.input_convolution, selection.input_dims["4.weight"]
    (['2.weight', '4.weight'], ['0.weight'], 1)
    >>> sorted(select_parameters(model, include=["*.weight"]).selected)  # BatchNorm's weight is 1-D
    ['0.weight', '2.weight', '4.weight']
    >>> sorted(select_parameters(model, exclude=["2.*"]).selected)
    ['4.weight']
    >>> class MyLinear(nn.Module):  # stores its weight (in, out), like transformers' Conv1D
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.w = nn.Parameter(torch.randn(4, 2))
    >>> select_parameters(nn.Sequential(MyLinear()), layer_types={MyLinear: LayerSpec(("w",), 0)}).input_dims
    {'0.w': 0}
"""

from __future__ import annotations

import difflib
from collections import Counter
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Mapping, Optional, Sequence, Union

from torch import nn


@dataclass(frozen=True)
class LayerSpec:
    """How a linear-like layer holds its connection weights.

    Args:
        weights: glob patterns over the layer's own parameter names that are connection weights.
        input_dim: the dimension of those weights that the layer sums over (the input features).

    Examples:
        >>> LayerSpec(), LayerSpec(("kernel",), input_dim=0)
        (LayerSpec(weights=('weight',), input_dim=1), LayerSpec(weights=('kernel',), input_dim=0))
    """

    weights: tuple[str, ...] = ("weight",)
    input_dim: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.weights, str) or not all(isinstance(w, str) and w for w in self.weights):
            raise ValueError(
                f"`LayerSpec.weights` must be a tuple of parameter-name patterns. Found: {self.weights!r}."
            )
        if isinstance(self.input_dim, bool) or not isinstance(self.input_dim, int) or self.input_dim < 0:
            raise ValueError(f"`LayerSpec.input_dim` must be an int >= 0. Found: {self.input_dim!r}.")


#: A layer type: the class itself, or its ``"module.QualName"`` (matched without importing the module).
LayerType = Union[type, str]

_OUT_IN = LayerSpec()
_IN_OUT = LayerSpec(input_dim=0)
BUILTIN_LAYERS: dict[LayerType, LayerSpec] = {
    nn.Linear: _OUT_IN,
    nn.Bilinear: _OUT_IN,
    nn.Conv1d: _OUT_IN,
    nn.Conv2d: _OUT_IN,
    nn.Conv3d: _OUT_IN,
    nn.ConvTranspose1d: _IN_OUT,
    nn.ConvTranspose2d: _IN_OUT,
    nn.ConvTranspose3d: _IN_OUT,
    nn.RNNBase: LayerSpec(("weight_ih_l*", "weight_hh_l*", "weight_hr_l*")),
    nn.MultiheadAttention: LayerSpec(("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")),
    "transformers.pytorch_utils.Conv1D": _IN_OUT,
    "transformers.modeling_utils.Conv1D": _IN_OUT,
}
#: Layers whose weights are targeted only when ``include`` names them (or when tied to a target).
EMBEDDING_LAYERS: dict[LayerType, LayerSpec] = {nn.Embedding: _OUT_IN, nn.EmbeddingBag: _OUT_IN}
#: Input dimension of an included parameter that no known layer owns: PyTorch's (out, in) convention.
DEFAULT_INPUT_DIM = 1


def _is_instance(module: nn.Module, layer_type: LayerType) -> bool:
    if isinstance(layer_type, str):
        return any(f"{cls.__module__}.{cls.__qualname__}" == layer_type for cls in type(module).__mro__)
    return isinstance(module, layer_type)


def find_spec(module: nn.Module, layer_types: Mapping[LayerType, LayerSpec]) -> Optional[LayerSpec]:
    """The spec of the first entry of ``layer_types`` that ``module`` is an instance of, if any."""
    return next((spec for layer_type, spec in layer_types.items() if _is_instance(module, layer_type)), None)


@dataclass
class Selection:
    """The parameters to prune, in model order, with what a user should know about the choice.

    ``input_dims``: each target's input dimension. ``layer_types``: each target's layer class name.
    ``tied``: for a target reachable under several names, all of them. ``left_out``: parameters of two or
    more dimensions that the default left dense, by layer class name. ``input_convolution``: the weights of
    the convolution that reads the network's input, which the default leaves dense (see
    :func:`select_parameters`). Frozen targets are chosen like any other: whether a cycle prunes one is
    decided at its transition (a frozen one stays dense then).
    """

    selected: dict[str, nn.Parameter]
    input_dims: dict[str, int] = field(default_factory=dict)
    layer_types: dict[str, str] = field(default_factory=dict)
    tied: dict[str, list[str]] = field(default_factory=dict)
    left_out: dict[str, list[str]] = field(default_factory=dict)
    input_convolution: list[str] = field(default_factory=list)

    def summary(self, left_dense: Optional[Mapping[str, str]] = None) -> str:
        """A short account of what the first sparse phase prunes and what it leaves dense: by default, and, with
        ``left_dense`` (the targets that phase leaves dense, with why, see ``DSDEngine.pruned_now``), because
        they are frozen, updated by no optimizer, or not rankable by magnitude.

        Examples:
            >>> model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), nn.Linear(4, 10))
            >>> print(select_parameters(model).summary())
            DSD prunes 2 tensors (56 weights): Linear x2. Left dense by default: Embedding x1 (0.weight).
            >>> print(select_parameters(model).summary({"1.weight": "frozen"}))
            DSD prunes 1 tensors (40 weights): Linear x1. Left dense because frozen: Linear x1 (1.weight). ...
        """
        left_dense = left_dense or {}
        pruned = [name for name in self.selected if name not in left_dense]
        total = sum(self.selected[name].numel() for name in pruned)
        lines = [f"DSD prunes {len(pruned)} tensors ({total} weights){_by_kind(pruned, self.layer_types, ': ')}."]
        reasons: dict[str, list[str]] = {}
        for name, reason in left_dense.items():
            reasons.setdefault(reason, []).append(name)
        for reason, names in reasons.items():
            lines.append(f"Left dense because {reason}:{_by_kind(names, self.layer_types, ' ')} ({shortened(names)}).")
        for names in self.tied.values():
            lines.append(f"Tied, pruned once and kept tied: {' = '.join(names)}.")
        if self.input_convolution:
            lines.append(
                f"Left dense by default: the convolution that reads the input ({shortened(self.input_convolution)}),"
                " as in the paper (the first convolution registered; if another one reads the input, `exclude` that"
                " one); to prune it too, use `include` patterns that name every target, e.g. `include=['*.weight']`."
            )
        if self.left_out:
            left = "; ".join(f"{kind} x{len(names)} ({shortened(names)})" for kind, names in self.left_out.items())
            lines.append(f"Left dense by default: {left}.")
        return " ".join(lines)


def _by_kind(names: Sequence[str], layer_types: Mapping[str, str], prefix: str) -> str:
    counts = Counter(layer_types[name] for name in names)
    return prefix + ", ".join(f"{kind} x{n}" for kind, n in counts.items()) if counts else ""


def shortened(names: Sequence[str], limit: int = 4, quoted: bool = False) -> str:
    """The first ``limit`` names (in backticks with ``quoted``), and how many more, as messages list them.

    Examples:
        >>> shortened(["a", "b", "c"], limit=2), shortened(["a"], quoted=True)
        ('a, b and 1 more', '`a`')
    """
    shown = ", ".join(f"`{name}`" if quoted else name for name in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def matches_any(name: str, patterns: Sequence[str]) -> bool:
    """Whether ``name`` matches one of the glob ``patterns`` (case-sensitive, as parameter names are)."""
    return any(fnmatchcase(name, pattern) for pattern in patterns)


@dataclass
class _Owner:
    """What the model's modules say about one parameter: its layer class and spec, if a known layer owns it."""

    layer_type: str = "parameter"
    spec: Optional[LayerSpec] = None
    is_default: bool = False


def _owners(model: nn.Module, layer_types: Mapping[LayerType, LayerSpec]) -> dict[int, _Owner]:
    """For every parameter (by identity), the known layer that owns it, connection layers first."""
    owners: dict[int, _Owner] = {}
    for module in model.modules():
        connection = find_spec(module, layer_types) or find_spec(module, BUILTIN_LAYERS)
        embedding = find_spec(module, EMBEDDING_LAYERS)
        for name, param in module.named_parameters(recurse=False):
            owner = owners.setdefault(id(param), _Owner())
            if connection is not None and matches_any(name, connection.weights) and not owner.is_default:
                owners[id(param)] = _Owner(type(module).__name__, connection, is_default=True)
            elif embedding is not None and matches_any(name, embedding.weights) and owner.spec is None:
                owners[id(param)] = _Owner(type(module).__name__, embedding)
    return owners


def select_parameters(
    model: nn.Module,
    include: Optional[Sequence[str]] = None,
    exclude: Optional[Sequence[str]] = None,
    layer_types: Optional[Mapping[LayerType, LayerSpec]] = None,
) -> Selection:
    """Resolve ``include``/``exclude`` against ``model`` into the parameters to prune, in model order.

    ``layer_types`` declares linear-like layers beyond the built-in ones (and may override those).
    Frozen parameters (``requires_grad=False``) are chosen too: a layer frozen now may train later
    (``BackboneFinetuning``), so whether a cycle prunes it is decided at that cycle's transition.
    """
    owners = _owners(model, layer_types or {})
    names_of: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    reads_input = _input_convolution(model, owners) if include is None else set()
    selection = Selection(selected={})
    for name, param in model.named_parameters():
        owner = owners[id(param)]
        if include is None and id(param) in reads_input:
            if not (exclude and matches_any(name, exclude)):
                selection.input_convolution.append(name)
            continue
        if include is None:
            wanted = owner.is_default
            if not wanted and param.dim() >= 2 and not (exclude and matches_any(name, exclude)):
                selection.left_out.setdefault(owner.layer_type, []).append(name)
        else:
            wanted = param.dim() >= 2 and matches_any(name, include)
        if not wanted or (exclude and matches_any(name, exclude)):
            continue
        selection.selected[name] = param
        selection.input_dims[name] = owner.spec.input_dim if owner.spec is not None else DEFAULT_INPUT_DIM
        selection.layer_types[name] = owner.layer_type
        if len(names_of[id(param)]) > 1:
            selection.tied[name] = names_of[id(param)]
    return selection


#: Convolutions that, reading the network's input, the default leaves dense: those of image and video networks
#: (a ``Conv1d`` most often reads an embedding; a transposed convolution reads a code, not data).
INPUT_CONVOLUTIONS = (nn.Conv2d, nn.Conv3d)


def _input_convolution(model: nn.Module, owners: Mapping[int, _Owner]) -> set[int]:
    """The weights (by identity) of the convolution that reads the network's input: the first module, in
    registration order (``model.modules()``), that owns a default target, when it is a ``Conv2d`` or ``Conv3d``
    (a subclass included); else none."""
    for module in model.modules():
        owned = [param for _, param in module.named_parameters(recurse=False) if owners[id(param)].is_default]
        if owned:
            return {id(param) for param in owned} if isinstance(module, INPUT_CONVOLUTIONS) else set()
    return set()


def uninitialized_parameters(model: nn.Module) -> list[str]:
    """Names of the parameters of lazy modules (``nn.LazyLinear``, ...) that no forward pass has shaped yet."""
    return [name for name, param in model.named_parameters() if isinstance(param, nn.parameter.UninitializedParameter)]


def check_selection(
    model: nn.Module, selection: Selection, include: Optional[Sequence[str]], exclude: Optional[Sequence[str]]
) -> None:
    """Refuse a selection DSD cannot prune: an empty one (listing the model's parameters), or one holding
    the weight of an embedding with ``sparse=True``, whose sparse gradients cannot be masked in place.

    Examples:
        >>> check_selection(nn.LayerNorm(4), select_parameters(nn.LayerNorm(4)), None, None)
        Traceback (most recent call last):
        ...
        ValueError: DSD found nothing to prune with include=None, exclude=[]. ...
    """
    if not selection.selected:
        available = [name for name, _ in model.named_parameters()]
        raise ValueError(
            f"DSD found nothing to prune with include={list(include) if include else None},"
            f" exclude={list(exclude or [])}. By default it prunes the connection weights of Linear, Conv,"
            " RNN/LSTM/GRU, MultiheadAttention and transformers' Conv1D layers (declare others with"
            " `layer_types`); `include` patterns may name any parameter of 2+ dimensions. The model's parameters"
            f" are: {available[:20]}{' ...' if len(available) > 20 else ''}."
        )
    chosen = {id(p) for p in selection.selected.values()}
    sparse = [
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.sparse and id(module.weight) in chosen
    ]
    if sparse:
        raise ValueError(
            f"DSD cannot prune {sparse}: the embedding has `sparse=True`, whose sparse gradients cannot"
            " be masked. Use `sparse=False` or `exclude` it."
        )


def unmatched_patterns(option: str, patterns: Optional[Sequence[str]], names: Sequence[str]) -> list[str]:
    """One message per glob pattern of ``option`` that matches none of ``names``, with the nearest names.

    Examples:
        >>> unmatched_patterns("exclude", ["conv1.*", "fc.wieght"], ["conv1.weight", "fc.weight"])
        ["`exclude` pattern 'fc.wieght' matches no parameter. Nearest names: ['fc.weight']."]
    """
    messages = []
    for pattern in patterns or ():
        if not any(fnmatchcase(name, pattern) for name in names):
            nearest = difflib.get_close_matches(pattern, list(names), n=3, cutoff=0.75)
            messages.append(f"`{option}` pattern {pattern!r} matches no parameter. Nearest names: {nearest}.")
    return messages
