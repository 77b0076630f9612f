"""Tools around a DSD run: :mod:`~lightning_dsd.tools.compare` (arms compared from their logs, with paired
intervals from :mod:`~lightning_dsd.tools.statistics`), :mod:`~lightning_dsd.tools.sensitivity` (a per-layer
sensitivity scan) and :mod:`~lightning_dsd.tools.demo` (the one-command demo)."""
