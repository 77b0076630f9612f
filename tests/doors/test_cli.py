"""Every sparsity option through a real ``LightningCLI``, from a YAML config and from the command line.

jsonargparse tries ``float`` first in ``Union[float, str]`` and YAML 1.1 reads ``2:4`` as the base-60 integer
124, so without :class:`~lightning_dsd.doors.lightning.cli.SparsityValue` an ``"N:M"`` pattern reached the callback as
``124.0``. These tests build the callback the way a user does and read back what it holds.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.cli import LightningCLI
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_dsd import DSDCallback
from lightning_dsd.rules.masks import NMPattern

BASE_60 = "base-60 integer"  # in the warning that an unquoted N:M was read back from YAML's integer


class TinyNet(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 2)
        self.kept_per_group: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def on_train_epoch_end(self) -> None:
        """The most weights kept in any group of 4 consecutive inputs of ``fc1``: 4 dense, 2 under 2:4."""
        self.kept_per_group.append(int((self.fc1.weight != 0).reshape(-1, 4).sum(dim=1).max()))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(16, 8, generator=generator)
        return DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=8)


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    """LightningCLI reads ``sys.argv`` too and warns when it holds pytest's own arguments."""
    monkeypatch.setattr(sys, "argv", ["train.py"])


TRAINER_ARGS = [
    "--trainer.logger=false",
    "--trainer.enable_checkpointing=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.accelerator=cpu",
]


def _cli(tmp_path: Path, args: list[str], subcommand: str | None = None) -> LightningCLI:
    """``LightningCLI`` as ``python train.py [subcommand] ...`` runs it; without a subcommand it only builds."""
    return LightningCLI(
        TinyNet,
        args=[*([subcommand] if subcommand else []), f"--trainer.default_root_dir={tmp_path}", *TRAINER_ARGS, *args],
        seed_everything_default=False,
        run=subcommand is not None,
    )


def _config(tmp_path: Path, init_args: str) -> Path:
    """A config file naming the callback by class_path; ``init_args`` is YAML, exactly as a user writes it."""
    lines = "\n".join(f"        {line}" for line in init_args.strip().splitlines())
    path = tmp_path / "config.yaml"
    path.write_text(
        "trainer:\n"
        "  callbacks:\n"
        "    - class_path: lightning_dsd.DSDCallback\n"
        "      init_args:\n"
        "        dense_epochs: 1\n"
        "        sparse_epochs: 1\n"
        "        redense_epochs: 1\n"
        f"{lines}\n"
    )
    return path


def _built_callback(cli: LightningCLI) -> DSDCallback:
    (dsd,) = [c for c in cli.trainer.callbacks if isinstance(c, DSDCallback)]
    return dsd


def _from_config(tmp_path: Path, init_args: str) -> tuple[DSDCallback, list[str]]:
    """The callback built from a config file, and the messages of the warnings that building it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = _cli(tmp_path, [f"--config={_config(tmp_path, init_args)}"])
    return _built_callback(cli), [str(w.message) for w in caught]


def _from_flags(tmp_path: Path, *flags: str) -> DSDCallback:
    args = [
        "--trainer.callbacks+=lightning_dsd.DSDCallback",
        "--trainer.callbacks.init_args.dense_epochs=1",
        "--trainer.callbacks.init_args.sparse_epochs=1",
        "--trainer.callbacks.init_args.redense_epochs=1",
        *flags,
    ]
    return _built_callback(_cli(tmp_path, args))


@pytest.mark.parametrize(
    "init_args, sparsities",
    [
        ("sparsity: '2:4'", (NMPattern(2, 4),)),
        ('sparsity: "2:4"', (NMPattern(2, 4),)),
        ("sparsity: '1:64'", (NMPattern(1, 64),)),
        ("sparsity: 0.5", (0.5,)),
        ("sparsity: [0.5, 0.25]", (0.5, 0.25)),
        ("sparsity: ['2:4', 0.5]", (NMPattern(2, 4), 0.5)),
        ("sparsity:\n  - 0.5\n  - '1:8'", (0.5, NMPattern(1, 8))),
    ],
)
def test_a_yaml_config_gives_the_sparsity_as_written(tmp_path, init_args, sparsities):
    dsd, warned = _from_config(tmp_path, init_args)
    assert dsd.sparsities == sparsities
    assert all(type(s) is float or type(s) is NMPattern for s in dsd.sparsities)
    assert not [w for w in warned if BASE_60 in w]


@pytest.mark.parametrize(
    "init_args, sparsities",
    [
        ("sparsity: 2:4", (NMPattern(2, 4),)),
        ("sparsity: [2:4, 0.5]", (NMPattern(2, 4), 0.5)),
        ("sparsity:\n  - 0.5\n  - 1:8", (0.5, NMPattern(1, 8))),
    ],
)
def test_an_unquoted_pattern_in_yaml_is_read_back_from_yaml_base_60_with_a_warning_to_quote_it(
    tmp_path, init_args, sparsities
):
    dsd, warned = _from_config(tmp_path, init_args)
    assert dsd.sparsities == sparsities
    assert any("Quote the pattern" in w and BASE_60 in w for w in warned), warned


@pytest.mark.parametrize(
    "layer_sparsity, expected",
    [
        ("{fc1.*: '2:4'}", {"fc1.*": NMPattern(2, 4)}),
        ('{"fc1.*": "2:4", "fc2.*": 0.3}', {"fc1.*": NMPattern(2, 4), "fc2.*": 0.3}),
        ("\n  fc1.*: 0.8\n  fc2.*: 0.25", {"fc1.*": 0.8, "fc2.*": 0.25}),
        ("\n  fc1.*: 2:4", {"fc1.*": NMPattern(2, 4)}),
    ],
)
def test_a_yaml_layer_sparsity_mapping_gives_the_values_as_written(tmp_path, layer_sparsity, expected):
    dsd, _ = _from_config(tmp_path, f"sparsity: 0.5\nlayer_sparsity: {layer_sparsity}")
    assert dsd.sparsities == (0.5,)
    assert dsd.layer_sparsity == expected


@pytest.mark.parametrize(
    "flags, sparsities, layer_sparsity",
    [
        (["--trainer.callbacks.init_args.sparsity", "2:4"], (NMPattern(2, 4),), None),
        (["--trainer.callbacks.init_args.sparsity=2:4"], (NMPattern(2, 4),), None),
        (["--trainer.callbacks.sparsity=1:8"], (NMPattern(1, 8),), None),
        (["--trainer.callbacks.init_args.sparsity", "0.5"], (0.5,), None),
        (["--trainer.callbacks.init_args.sparsity", "[0.5, 0.25]"], (0.5, 0.25), None),
        (["--trainer.callbacks.init_args.sparsity", '["2:4", 0.5]'], (NMPattern(2, 4), 0.5), None),
        (
            ["--trainer.callbacks.init_args.sparsity=0.5", "--trainer.callbacks.init_args.layer_sparsity",
             '{"fc1.*": "2:4", "fc2.*": 0.3}'],
            (0.5,),
            {"fc1.*": NMPattern(2, 4), "fc2.*": 0.3},
        ),
    ],
)
def test_a_command_line_flag_gives_the_sparsity_as_written(tmp_path, flags, sparsities, layer_sparsity):
    dsd = _from_flags(tmp_path, *flags)
    assert dsd.sparsities == sparsities
    assert dsd.layer_sparsity == layer_sparsity


@pytest.mark.parametrize(
    "init_args, message",
    [
        ("sparsity: '4:2'", r"`sparsity` must be .* Found: '4:2' \(an N:M pattern needs integers 0 < N < M"),
        ("sparsity: 4:2", r"`sparsity` must be .* Found: 242.0, which is how YAML 1.1 reads an unquoted 4:2 .*"
                          r" Quote the pattern you meant"),
        ("sparsity: 1.5", r"`sparsity` must be a float in \(0, 1\) .* Found: 1.5\."),
        ("sparsity: [0.5, 'half']", r"`sparsity` must be .* Found: 'half'"),
        ("sparsity: 0.5\nlayer_sparsity: {fc1.*: '2:2'}", r"`layer_sparsity` must map .* Found: '2:2'"),
    ],
)
def test_a_wrong_value_still_gets_the_callbacks_own_error(tmp_path, init_args, message):
    with pytest.raises(ValueError, match=message), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _from_config(tmp_path, init_args)


def test_a_fit_through_the_cli_prunes_2_of_4_and_the_config_it_saves_gives_the_pattern_back(tmp_path):
    """A real ``fit``: every group of 4 inputs keeps 2 weights in the sparse epoch, and the config.yaml that
    LightningCLI saves holds the pattern quoted, so a new run built from it gets 2:4 again."""
    config = _config(tmp_path, "sparsity: 2:4\nlayer_sparsity: {fc2.*: 0.5}")
    run_dir = tmp_path / "run"
    with pytest.warns(UserWarning, match=BASE_60):
        cli = _cli(run_dir, [f"--config={config}", "--trainer.max_epochs=3"], subcommand="fit")
    assert _built_callback(cli).sparsities == (NMPattern(2, 4),)
    dense, sparse, redense = cli.model.kept_per_group
    assert sparse == 2 and dense == redense == 4
    saved = (run_dir / "config.yaml").read_text()
    assert "sparsity: '2:4'" in saved
    rerun_dir = tmp_path / "rerun"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rerun = _cli(rerun_dir, [f"--config={run_dir / 'config.yaml'}", f"--trainer.default_root_dir={rerun_dir}"],
                     subcommand="fit")
    assert not [w for w in caught if BASE_60 in str(w.message)]
    assert _built_callback(rerun).sparsities == (NMPattern(2, 4),)
    assert _built_callback(rerun).layer_sparsity == {"fc2.*": 0.5}
    assert rerun.model.kept_per_group == [4, 2, 4]
