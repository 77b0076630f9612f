"""The paper's weight-distribution figure for one layer and one cycle, in five panels.

(a) the dense bell, (b) the gap pruning cuts around zero, (c) the bimodal "soft boundary" after sparse
retraining, (d) the pruned weights back as a spike at zero, (e) the spread after re-dense. Panels (b) and
(c) leave out the exact zeros, as the paper does, so the gap shows; (d) and (e) show every weight.
Needs matplotlib (the ``figures`` extra). Built on ``matplotlib.figure.Figure``, without pyplot's global
state, so it is safe in training processes and headless machines.

Examples:
    >>> import torch
    >>> from lightning_dsd.rules.phases import Moment
    >>> w = torch.randn(1000)
    >>> figure = five_panel_figure("fc.weight", 0, {Moment.END_OF_DENSE: w})
    >>> len(figure.axes)
    5
"""

from __future__ import annotations

from typing import Mapping

from matplotlib.figure import Figure
from torch import Tensor

from lightning_dsd.rules.phases import Moment

PANEL_TITLES = {
    Moment.END_OF_DENSE: "(a) end of dense",
    Moment.AFTER_PRUNING: "(b) after pruning",
    Moment.END_OF_SPARSE: "(c) end of sparse",
    Moment.START_OF_REDENSE: "(d) start of re-dense",
    Moment.END_OF_REDENSE: "(e) end of re-dense",
}
NONZERO_PANELS = (Moment.AFTER_PRUNING, Moment.END_OF_SPARSE)


def five_panel_figure(
    layer: str, cycle: int, panels: Mapping[Moment, Tensor], bins: int = 80, title: str = "DSD weight distribution"
) -> Figure:
    """One row of five histograms with a shared x range; a moment not reached is drawn as an empty panel. The
    figure's title starts with ``title`` (the LLR control's says that nothing was pruned)."""
    figure = Figure(figsize=(16, 3.2), layout="constrained")
    axes = figure.subplots(1, len(PANEL_TITLES), sharex=True)
    reached = [values for values in panels.values() if values.numel()]
    limit = max((float(v.abs().max()) for v in reached), default=1.0) or 1.0
    for ax, (moment, title) in zip(axes, PANEL_TITLES.items(), strict=False):
        ax.set_title(title, fontsize=10)
        ax.set_xlim(-limit, limit)
        ax.tick_params(labelsize=7)
        values = panels.get(moment)
        if values is None:
            ax.text(0.5, 0.5, "not reached", ha="center", va="center", transform=ax.transAxes, color="grey")
            continue
        if moment in NONZERO_PANELS:
            values = values[values != 0]
        ax.hist(values.numpy(), bins=bins, range=(-limit, limit), color="#2a6fb0")
    figure.suptitle(f"{title}: {layer}, cycle {cycle}", fontsize=11)
    return figure
