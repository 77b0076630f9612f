"""DSD built by Hydra from YAML, as Hydra users write it: ``hydra.utils.instantiate`` of a ``_target_`` config and
a real ``@hydra.main`` app. YAML 1.1 (which OmegaConf reads) makes an unquoted ``2:4`` the base-60 integer 124;
every door reads it back as ``"2:4"`` with a warning to quote it (:func:`lightning_dsd.rules.options.read_base_60`),
in ``sparsity`` and in ``layer_sparsity`` values alike.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from lightning_dsd import DSDCallback
from lightning_dsd.rules.masks import NMPattern

BASE_60 = "base-60 integer"  # in the warning that an unquoted N:M was read back from YAML's integer


def _instantiated(yaml_text: str, **overrides):
    """The object Hydra builds from ``yaml_text``, and the messages of the warnings building it gave."""
    config = OmegaConf.create(yaml_text)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        built = instantiate(config, **overrides)
    return built, [str(w.message) for w in caught]


@pytest.mark.parametrize("target", ["lightning_dsd.DSDCallback", "lightning_dsd.huggingface.DSDTrainerCallback"])
def test_instantiate_reads_an_unquoted_pattern_back_in_sparsity_and_layer_sparsity_with_a_warning(target):
    yaml_text = f"""
        _target_: {target}
        sparsity: [2:4, 0.5]
        dense_epochs: 1
        sparse_epochs: 1
        redense_epochs: 1
        layer_sparsity:
          head.*: 1:8
    """
    dsd, warned = _instantiated(textwrap.dedent(yaml_text))
    assert dsd.sparsities == (NMPattern(2, 4), 0.5)
    assert dsd.layer_sparsity == {"head.*": NMPattern(1, 8)}
    quoted = [w for w in warned if BASE_60 in w and "Quote the pattern" in w]
    assert any("Read the sparsity 124 as the N:M pattern '2:4'" in w for w in quoted), warned
    assert any("Read the sparsity 68 as the N:M pattern '1:8'" in w for w in quoted), warned


def test_instantiate_of_the_loop_door_prunes_2_of_4_from_an_unquoted_pattern():
    """The plain-loop door built by Hydra: what the model computes after the transition is 2:4 sparse."""
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    yaml_text = "_target_: lightning_dsd.DSD\nsparsity: 2:4\ndense_epochs: 1\nsparse_epochs: 1\nredense_epochs: 1\n"
    dsd, warned = _instantiated(yaml_text, model=model, optimizers=optimizer, log_histograms=False,
                                log_scalars=False)
    assert any(BASE_60 in w for w in warned), warned
    dsd.step()  # one epoch done: the sparse phase begins
    seen = []
    model[0].register_forward_pre_hook(lambda module, args: seen.append(module.weight.detach().clone()))
    model(torch.randn(2, 8))
    (weight,) = seen
    assert bool(((weight != 0).reshape(-1, 4).sum(dim=1) == 2).all())


def test_instantiate_refuses_an_unquoted_invalid_pattern_naming_the_yaml_reading_and_the_fix():
    with pytest.raises(InstantiationException, match=r"Found: 242, which is how YAML 1.1 reads an unquoted 4:2 .*"
                       r" Quote the pattern you meant") as raised:
        _instantiated("_target_: lightning_dsd.DSDCallback\nsparsity: 4:2\ndense_epochs: 1\nsparse_epochs: 1\n"
                      "redense_epochs: 1\n")
    assert isinstance(raised.value.__cause__, ValueError)  # the callback's own error, which Hydra wraps


APP = '''
import warnings

import hydra

warnings.simplefilter("always")


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(config):
    dsd = hydra.utils.instantiate(config.dsd)
    print("SPARSITIES", [str(s) for s in dsd.sparsities])


main()
'''


@pytest.mark.slow  # a fresh interpreter imports Lightning: 5-20 s
def test_a_hydra_main_app_builds_the_callback_from_an_unquoted_pattern_with_the_warning(tmp_path):
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "config.yaml").write_text(textwrap.dedent("""
        dsd:
          _target_: lightning_dsd.DSDCallback
          sparsity: 2:4
          dense_epochs: 1
          sparse_epochs: 1
          redense_epochs: 1
    """))
    (tmp_path / "app.py").write_text(APP)
    result = subprocess.run(
        [sys.executable, "app.py", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "SPARSITIES ['2:4']" in result.stdout
    assert "Read the sparsity 124 as the N:M pattern '2:4'" in result.stderr and "Quote the pattern" in result.stderr


@pytest.mark.parametrize("value", [124, 124.0])
def test_a_whole_number_of_a_valid_pattern_is_read_back_as_int_or_float_and_an_invalid_one_is_refused(value):
    """Found by an adversarial review: ``124.0`` (what a float-first parser makes of 124) was refused with the
    claim that 2:4 is no N:M pattern."""
    with pytest.warns(UserWarning, match=r"Read the sparsity 124 as the N:M pattern '2:4'"):
        assert DSDCallback(value, 1, 1, 1).sparsities == (NMPattern(2, 4),)
    with pytest.raises(ValueError, match=r"Found: 242.0, which is how YAML 1.1 reads an unquoted 4:2 .* and 4:2 is no"
                                         r" N:M pattern"):
        DSDCallback(242.0, 1, 1, 1)
