"""The one declaration of DSD's options: every door offers exactly its keyword options with its defaults,
every option is checked by it and readable on the door, and nothing else is taken. Bad arguments are refused at
construction with a message naming the argument, the value and what is allowed."""

from __future__ import annotations

import ast
import inspect
import re
import typing
from dataclasses import fields

import pytest
import torch
from helpers import ROOT
from torch import nn

from lightning_dsd import DSD, DSDCallback
from lightning_dsd.huggingface import DSDTrainerCallback
from lightning_dsd.rules.options import KEYWORD_OPTIONS, DSDOptions, Option, ReadsOptions, check_options, door_options
from lightning_dsd.rules.selection import LayerSpec

POSITIONAL = ["sparsity", "dense_epochs", "sparse_epochs", "redense_epochs"]
DOOR_ONLY = {  # what a door takes beyond the shared options, and the shared options a door leaves out
    DSDCallback: ({"stop_at_end", "export_sparse"}, set()),
    DSD: ({"model", "optimizers", "schedulers", "writer"}, {"monitor"}),  # DSD.step(metric) replaces monitor
    DSDTrainerCallback: ({"stop_at_end", "best_model_phase"}, set()),
}


@pytest.mark.parametrize("door", sorted(DOOR_ONLY, key=lambda d: d.__name__), ids=lambda d: d.__name__)
def test_every_door_offers_the_declared_options_with_the_declared_defaults(door):
    parameters = inspect.signature(door.__init__).parameters
    own, left_out = DOOR_ONLY[door]
    assert not [n for n, p in parameters.items() if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)], "explicit, for IDEs"
    assert own <= set(parameters)
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
    trainer_callback = DSDTrainerCallback(0.5, 1, 2, 3, scope="global", patience=5)
    for door in (callback, loop, trainer_callback):
        for name in ("sparsities", "lengths", *KEYWORD_OPTIONS):
            assert getattr(door, name) == getattr(door.options, name), name
        assert (door.scope, door.patience, door.lengths) == ("global", 5, (1, 2, 3))
        with pytest.raises(AttributeError, match=r"`scope` is a checked DSD option, read-only"):
            door.scope = "layer"
        with pytest.raises(AttributeError, match=r"has no attribute 'scop'"):
            door.scop  # noqa: B018


def test_every_field_has_its_typed_read_with_the_fields_type():
    reads = {name: read for name, read in vars(ReadsOptions).items() if isinstance(read, Option)}
    assert list(reads) == [f.name for f in fields(DSDOptions)], "one read per field, in the declaration's order"
    read_types, field_types = typing.get_type_hints(ReadsOptions), typing.get_type_hints(DSDOptions)
    for name in reads:
        assert read_types[name] == Option[field_types[name]], name


def test_no_door_reads_options_through_getattr_which_would_make_every_read_any():
    for door in DOOR_ONLY:
        assert issubclass(door, ReadsOptions)
        assert not any("__getattr__" in vars(cls) for cls in door.__mro__ if cls is not object), door


def test_every_field_is_documented_under_its_declaration():
    """The meaning of each option is written once, as the docstring under its field (which mkdocstrings renders)."""
    source = (ROOT / "lightning_dsd" / "rules" / "options.py").read_text()
    declaration = next(node for node in ast.walk(ast.parse(source))
                       if isinstance(node, ast.ClassDef) and node.name == "DSDOptions")
    body = declaration.body
    documented = {
        statement.target.id: body[i + 1].value.value
        for i, statement in enumerate(body[:-1])
        if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
        and isinstance(body[i + 1], ast.Expr) and isinstance(body[i + 1].value, ast.Constant)
        and isinstance(body[i + 1].value.value, str)
    }
    names = [f.name for f in fields(DSDOptions)]
    assert [name for name in names if len(documented.get(name, "").split()) < 5] == [], "each field needs a meaning"


TYPO = """from lightning_dsd.doors.base import ReadsEngine


def reads(door: ReadsEngine) -> None:
    reveal_type(door.lr_scale)
    reveal_type(door.seed)
    door.intervall
    door.scope = "global"
"""


def test_mypy_types_each_read_and_refuses_a_misspelt_option_and_a_write(tmp_path):
    api = pytest.importorskip("mypy.api")
    source = tmp_path / "door_reads.py"
    source.write_text(TYPO)
    package = ROOT / "lightning_dsd"
    # Only the reads' own modules are checked, every other import taken as Any: seconds, not the package's minute.
    stdout, stderr, status = api.run([
        "--follow-imports=skip", "--config-file=", f"--cache-dir={tmp_path / 'cache'}", "--no-error-summary",
        str(source), str(package / "rules" / "options.py"), str(package / "doors" / "base.py"),
    ])
    assert re.search(r'door_reads.py:5: note: Revealed type is "(builtins\.)?float"', stdout), stdout + stderr
    assert re.search(r'door_reads.py:6: note: Revealed type is "(builtins\.)?int"', stdout), stdout
    assert 'door_reads.py:7: error: "ReadsEngine" has no attribute "intervall"' in stdout, stdout
    assert re.search(r'door_reads.py:8: error: Incompatible types in assignment .*"Never"', stdout), stdout
    assert stdout.count("error:") == 2 and status == 1, stdout


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


# ------------------------------------------------------------------ the checks

VALID = dict(sparsity=0.5, dense_epochs=1, sparse_epochs=1, redense_epochs=1)

CONSTRUCTION_ERRORS = [
    (dict(sparsity=0.0), ValueError, r"`sparsity` must be a float in \(0, 1\).*Found: 0.0"),
    (dict(sparsity=1.0), ValueError, r"`sparsity`.*Found: 1.0"),
    (dict(sparsity=-0.2), ValueError, r"`sparsity`.*Found: -0.2"),
    (dict(sparsity=float("nan")), ValueError, r"`sparsity`.*Found: nan"),
    (dict(sparsity="0.5"), ValueError, r"`sparsity`.*Found: '0.5'"),
    (dict(sparsity=True), ValueError, r"`sparsity`.*Found: True"),
    (dict(sparsity=[]), ValueError, r"`sparsity`.*empty sequence"),
    (dict(sparsity=(0.5, 1.2)), ValueError, r"`sparsity`.*Found: 1.2"),
    (dict(dense_epochs=-1), ValueError, r"`dense_epochs` must be an int >= 0, or None.*Found: -1"),
    (dict(sparse_epochs=2.5), ValueError, r"`sparse_epochs` must be an int >= 0.*Found: 2.5"),
    (dict(redense_epochs="3"), ValueError, r"`redense_epochs`.*Found: '3'"),
    (dict(dense_epochs=None), ValueError, r"`dense_epochs` = None.*`monitor` must name a logged metric"),
    (dict(interval="batch"), ValueError, r"`interval` must be one of \['epoch', 'step'\]. Found: 'batch'"),
    (dict(mode="maximize"), ValueError, r"`mode` must be one of \['min', 'max'\]. Found: 'maximize'"),
    (dict(scope="model"), ValueError, r"`scope` must be one of \['layer', 'global'\]. Found: 'model'"),
    (dict(figure_layers=True), ValueError, r"`figure_layers` must be an int >= 0 \(how many of the largest layers\) or"
                                           r" glob patterns. Found: True"),
    (dict(patience=-1), ValueError, r"`patience` must be an int >= 0. Found: -1"),
    (dict(min_delta=float("inf")), ValueError, r"`min_delta` must be a finite number. Found: inf"),
    (dict(lr_scale=0), ValueError, r"`lr_scale` must be a finite number > 0. Found: 0"),
    (dict(lr_scale=-0.1), ValueError, r"`lr_scale`.*Found: -0.1"),
    (dict(include=[]), ValueError, r"`include` must be None, a glob pattern string.*Found: \[\]"),
    (dict(exclude=[3]), ValueError, r"`exclude`.*Found: \[3\]"),
    (dict(monitor=""), ValueError, r"`monitor` must be None or the name of a logged metric. Found: ''"),
    (dict(stop_at_end="yes"), TypeError, r"`stop_at_end` must be a bool. Found: 'yes'"),
    (dict(sparsity="4:2"), ValueError, r"`sparsity`.*'N:M'.*Found: '4:2' \(an N:M pattern needs integers 0 < N < M"),
    (dict(sparsity="2-4"), ValueError, r"`sparsity`.*Found: '2-4'"),
    (dict(layer_sparsity={"lstm.*": 1.5}), ValueError, r"`layer_sparsity` must map.*Found: 1.5"),
    (dict(layer_sparsity=[0.5]), ValueError, r"`layer_sparsity` must map.*Found: \[0.5\]"),
    (dict(layer_sparsity={"a.*": 0.5}, scope="global"), ValueError, r"`scope='global'`.*neither `layer_sparsity`"),
    (dict(sparsity="2:4", scope="global"), ValueError, r"`scope='global'`.*nor 'N:M' patterns"),
    (dict(export_sparse="onnx"), ValueError, r"`export_sparse` must be one of \['checkpoint', 'sparse'\]. Found: 'onnx'"),  # noqa: E501
    (dict(redense_init="he"), ValueError, r"`redense_init` must be one of \['zero', 'small_normal'\]. Found: 'he'"),
    (dict(seed=-1), ValueError, r"`seed` must be an int >= 0. Found: -1"),
    (dict(histogram_every_n_epochs=0), ValueError, r"`histogram_every_n_epochs` must be None or an int >= 1"),
    (dict(figure_layers=-1), ValueError, r"`figure_layers` must be an int >= 0 .*or glob patterns. Found: -1"),
    (dict(mask_storage="uint8"), ValueError, r"`mask_storage` must be one of \['weight_dtype', 'bool'\]"),
    (dict(log_histograms=1), TypeError, r"`log_histograms` must be a bool. Found: 1"),
    (dict(layer_types=[nn.Linear]), ValueError, r"`layer_types` must map nn.Module subclasses.*Found: \[<class"),
    (dict(layer_types={nn.Linear: 0}), ValueError, r"`layer_types` must map.*Found the entry <class.*Linear'>: 0"),
    (dict(layer_types={"Conv1D": LayerSpec()}), ValueError, r"`layer_types` must map.*Found the entry 'Conv1D'"),
]


@pytest.mark.parametrize("kwargs, message", [
    (dict(weights="weight"), r"`LayerSpec.weights` must be a tuple of parameter-name patterns. Found: 'weight'"),
    (dict(input_dim=-1), r"`LayerSpec.input_dim` must be an int >= 0. Found: -1"),
])
def test_bad_layer_specs_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LayerSpec(**kwargs)


@pytest.mark.parametrize("overrides, error, message", CONSTRUCTION_ERRORS, ids=[str(c[0]) for c in CONSTRUCTION_ERRORS])
def test_bad_arguments_are_refused_at_construction(overrides, error, message):
    with pytest.raises(error, match=message):
        DSDCallback(**{**VALID, **overrides})


def test_numpy_integers_are_taken_as_the_ints_they_are():
    import numpy as np

    dsd = DSDCallback(0.5, np.int64(2), np.int32(1), 1, patience=np.int64(4), histogram_every_n_epochs=np.int8(2))
    assert dsd.lengths == (2, 1, 1) and dsd.patience == 4 and dsd.histogram_every_n_epochs == 2
    assert all(type(value) is int for value in (*dsd.lengths, dsd.patience, dsd.histogram_every_n_epochs))
