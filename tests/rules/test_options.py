"""The one declaration of DSD's options: every door offers exactly its keyword options with its defaults,
every option is checked by it and readable on the door, and nothing else is taken."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

from lightning_dsd import DSD, DSDCallback
from lightning_dsd.rules.options import KEYWORD_OPTIONS, DSDOptions, check_options, door_options

POSITIONAL = ["sparsity", "dense_epochs", "sparse_epochs", "redense_epochs"]
DOOR_ONLY = {  # what a door takes beyond the shared options, and the shared options a door leaves out
    DSDCallback: ({"stop_at_end", "export_sparse"}, set()),
    DSD: ({"model", "optimizers", "schedulers", "writer"}, {"monitor"}),  # DSD.step(metric) replaces monitor
}


@pytest.mark.parametrize("door", sorted(DOOR_ONLY, key=lambda d: d.__name__), ids=lambda d: d.__name__)
def test_every_door_offers_the_declared_options_with_the_declared_defaults(door):
    parameters = inspect.signature(door.__init__).parameters
    own, left_out = DOOR_ONLY[door]
    keywords = {n: p.default for n, p in parameters.items() if p.kind is p.KEYWORD_ONLY and n not in own}
    assert keywords == {n: d for n, d in KEYWORD_OPTIONS.items() if n not in left_out}
    assert list(keywords) == [n for n in KEYWORD_OPTIONS if n not in left_out], "in the declaration's order"
    positional = [n for n, p in parameters.items() if p.kind is p.POSITIONAL_OR_KEYWORD and n not in own | {"self"}]
    assert positional == POSITIONAL


def test_check_options_fills_defaults_and_refuses_what_the_declaration_does_not_know():
    options = check_options(0.5, 1, 2, 3, lr_scale=0.5)
    assert options == DSDOptions(sparsities=(0.5,), lengths=(1, 2, 3), lr_scale=0.5)
    assert options.waits_for_metric is False
    assert check_options((0.5, "2:4"), None, 1, 1, monitor="val_loss").waits_for_metric is True
    unknown = r"Unknown DSD option\(s\) \['lr_scal'\]. The options are: \['final_sparse_epochs', 'interval'"
    with pytest.raises(TypeError, match=unknown):
        check_options(0.5, 1, 1, 1, lr_scal=0.5)
    with pytest.raises(ValueError, match=r"`scope='global'` sets one threshold.*Found: layer_sparsity=None,"
                                         r" sparsity=\['2:4'\]"):
        check_options("2:4", 1, 1, 1, scope="global")


def test_door_options_picks_the_keyword_options_from_a_doors_arguments():
    assert door_options({"self": object(), "sparsity": 0.5, "scope": "global", "writer": None}) == {"scope": "global"}


def test_every_option_is_a_read_only_attribute_of_each_door():
    callback = DSDCallback(0.5, 1, 2, 3, scope="global", patience=5)
    model = nn.Linear(4, 4)
    loop = DSD(model, torch.optim.SGD(model.parameters(), lr=0.1), 0.5, 1, 2, 3, scope="global", patience=5)
    for door in (callback, loop):
        for name in ("sparsities", "lengths", *KEYWORD_OPTIONS):
            assert getattr(door, name) == getattr(door.options, name), name
        assert (door.scope, door.patience, door.lengths) == ("global", 5, (1, 2, 3))
        with pytest.raises(AttributeError, match=r"`scope` is a checked DSD option, read-only"):
            door.scope = "layer"
        with pytest.raises(AttributeError, match=r"has no attribute 'scop'"):
            door.scop  # noqa: B018


def test_per_cycle_lengths_and_a_final_sparse_phase_are_checked_once_for_every_door():
    options = check_options((0.8, 0.9), 2, [5, 4], (3, 2), final_sparse_epochs=10, redense_state="all")
    assert options.lengths == (2, (5, 4), (3, 2)) and options.ends_sparse
    assert options.cycle_sparsities == (0.8, 0.9, 0.9)  # the final sparse phase prunes at the last cycle's sparsity
    assert check_options(0.5, 1, 1, 1).cycle_sparsities == (0.5,)
    assert check_options((0.5, 0.5), 1, (1, None), 1, monitor="val_loss").waits_for_metric is True
    with pytest.raises(ValueError, match=r"`final_sparse_epochs` = None runs a phase until a metric converges"):
        check_options(0.5, 1, 1, 1, final_sparse_epochs=None)
    with pytest.raises(ValueError, match=r"`sparse_epochs`, `redense_epochs` = None"):
        check_options((0.5, 0.5), 1, (1, None), None)
    model = nn.Linear(4, 4)
    refusals = [
        (lambda: DSDCallback((0.5, 0.5), 1, [5, 5, 5], 1),
         r"`sparse_epochs` gives 3 lengths, but `sparsity` gives 2 cycles: pass one length for every cycle, or a"
         r" sequence of exactly 2 \(one per cycle, in order\). Found: sparse_epochs=\[5, 5, 5\]."),
        (lambda: DSD(model, torch.optim.SGD(model.parameters(), lr=0.1), 0.5, 1, 1, (2, 3)),
         r"`redense_epochs` gives 2 lengths, but `sparsity` gives 1 cycle: .* Found: redense_epochs=\(2, 3\)."),
        (lambda: DSDCallback(0.5, 1, [-1], 1), r"`sparse_epochs\[0\]` must be an int >= 0"),
        (lambda: DSDCallback(0.5, 1, 1, 1, final_sparse_epochs=1.5), r"`final_sparse_epochs` must be an int >= 0"),
        (lambda: DSDCallback(0.5, 1, 1, 1, redense_state="moments"),
         r"`redense_state` must be one of \['pruned', 'all'\]"),
    ]
    for build, message in refusals:
        with pytest.raises(ValueError, match=message):
            build()
