"""Bad arguments are refused at construction with a message naming the argument, the value and what is
allowed (``lightning_dsd.rules.arguments``)."""

from __future__ import annotations

import pytest
from torch import nn

from lightning_dsd import DSDCallback
from lightning_dsd.rules.selection import LayerSpec

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
