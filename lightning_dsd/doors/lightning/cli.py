"""``LightningCLI``'s reading of a sparsity: :class:`SparsityValue`, and its registration with jsonargparse.

jsonargparse (and so ``LightningCLI``) builds a door from a config file or the command line by its signature; this
module gives the sparsity options a type that keeps an ``"N:M"`` pattern as the text it was written as. It imports
no Lightning: the loop door (:class:`~lightning_dsd.DSD`), which jsonargparse can build too, imports it from here.
"""

from __future__ import annotations

from typing import Any

from lightning_dsd.rules.options import read_base_60


class SparsityValue(str):
    """An ``"N:M"`` sparsity exactly as written in a config file or on the command line (a ``str``).

    Use it first in the annotation of a sparsity option, as in ``Union[SparsityValue, float, str]``, so that
    jsonargparse (and through it ``LightningCLI``) keeps ``2:4`` as the text ``"2:4"``. Without it,
    jsonargparse tries ``float`` first and reads ``2:4`` as ``124.0``: YAML 1.1 reads an unquoted ``2:4`` as
    the base-60 integer ``2 * 60 + 4``, and even a quoted ``"2:4"`` goes through that reading when converted
    to ``float``. On import, :mod:`lightning_dsd.doors.lightning.cli` registers this type with jsonargparse (when
    it is installed), so that:

    - a string holding ``":"`` (a quoted ``'2:4'`` in YAML, ``--...sparsity 2:4`` on the command line)
      becomes a ``SparsityValue`` unchanged, valid or not, so
      :func:`~lightning_dsd.rules.options.check_sparsity` shows the error;
    - an integer ``60 * N + M`` of a valid ``N:M``, which is how YAML 1.1 reads an unquoted ``N:M`` (``124``
      from ``2:4`` in a YAML file or in a ``[2:4, 0.5]`` list), becomes that ``N:M`` (``"2:4"``), with a
      warning to quote it (see :func:`~lightning_dsd.rules.options.read_base_60`, which
      :func:`~lightning_dsd.rules.options.check_sparsity` applies in every door);
    - anything else is refused, so jsonargparse goes on to ``float`` (``0.5``) and then ``str``;
    - it is dumped (``--print_config``, the ``config.yaml`` ``LightningCLI`` saves) as a quoted ``'2:4'``.

    The value is validated where every sparsity is, by :func:`~lightning_dsd.rules.options.check_sparsity`.

    Examples:
        >>> SparsityValue.from_parsed("2:4"), SparsityValue.from_parsed("4:2")
        ('2:4', '4:2')
        >>> import warnings
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")  # the warning to quote the pattern
        ...     SparsityValue.from_parsed(124)  # how YAML 1.1 reads an unquoted 2:4
        '2:4'
        >>> SparsityValue.from_parsed(0.5)
        Traceback (most recent call last):
        ...
        ValueError: not an 'N:M' pattern: 0.5.
        >>> from lightning_dsd.rules.options import check_sparsity
        >>> check_sparsity(SparsityValue("2:4"))
        NMPattern(n=2, m=4)
    """

    __slots__ = ()

    @classmethod
    def from_parsed(cls, value: Any) -> "SparsityValue":
        """``value`` as jsonargparse parsed it (a string, or YAML's base-60 integer) as ``"N:M"`` text; YAML's
        integer is read back by :func:`~lightning_dsd.rules.options.read_base_60`, which warns."""
        if isinstance(value, str) and ":" in value:
            return cls(value)
        pattern = read_base_60(value)
        if pattern is not None:
            return cls(str(pattern))
        raise ValueError(f"not an 'N:M' pattern: {value!r}.")


def _serialize_sparsity_value(value: Any) -> str:
    """Dump a string sparsity as text; refuse anything else, so jsonargparse dumps floats and lists as such."""
    if not isinstance(value, str):
        raise TypeError(f"not an 'N:M' pattern: {value!r}.")
    return str(value)


def _register_with_jsonargparse() -> None:
    try:
        from jsonargparse.typing import register_type
    except ImportError:  # jsonargparse comes with LightningCLI's extra, not with this package
        return
    register_type(
        SparsityValue,
        serializer=_serialize_sparsity_value,
        deserializer=SparsityValue.from_parsed,
        deserializer_exceptions=(ValueError, TypeError),
    )


_register_with_jsonargparse()
