"""Every YAML in configs/ is parsed against the signatures it feeds (tasks, data modules, Trainer,
strategies; `configs/data/` against `mmtune data align`): unknown keys, wrong types and unknown class
paths fail here, not in a user's run."""

from __future__ import annotations

from pathlib import Path

import pytest
from lightning.pytorch import LightningDataModule, LightningModule

from mmtune.cli import MMTuneCLI
from mmtune.data.align.cli import parse_spec
from mmtune.errors import ConfigError

CONFIGS = Path(__file__).parent.parent / "configs"
# configs/search/ holds `mmtune tune` search files, checked against the configs they feed in tests/test_tune.py
TASK_CONFIGS = sorted(p for p in CONFIGS.rglob("*.yaml") if p.parent.name not in ("trainer", "data", "search"))
TRAINER_PRESETS = sorted((CONFIGS / "trainer").glob("*.yaml"))
ALIGN_CONFIGS = sorted((CONFIGS / "data").glob("*.yaml"))


class _Parsed(Exception):
    pass


class ParseOnlyCLI(MMTuneCLI):
    """Parses and type-checks like `mmtune fit`, then stops before building anything."""

    def before_instantiate_classes(self) -> None:
        raise _Parsed(self.config)


def parse(*configs: Path):
    with pytest.raises(_Parsed) as parsed:
        ParseOnlyCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                     args=["fit", *[a for c in configs for a in ("--config", str(c))]])
    return parsed.value.args[0].fit


def test_there_are_configs():
    assert len(TASK_CONFIGS) >= 4 and len(TRAINER_PRESETS) >= 4


@pytest.mark.parametrize("config", TASK_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_task_config_parses(config):
    cfg = parse(config)
    assert cfg.model.class_path.startswith("mmtune.") and cfg.data.class_path.startswith("mmtune.")
    assert cfg.model.init_args.model.name


@pytest.mark.parametrize("preset", TRAINER_PRESETS, ids=lambda p: p.name)
def test_trainer_preset_composes_with_a_task(preset):
    cfg = parse(preset, CONFIGS / "classification" / "vit_lora.yaml")
    assert cfg.trainer.devices is not None


def test_a_wrong_key_in_a_config_fails(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((CONFIGS / "classification" / "vit_lora.yaml").read_text().replace("layer_decay", "layer_decays"))
    with pytest.raises(SystemExit):
        parse(bad)


@pytest.mark.parametrize("config", ALIGN_CONFIGS, ids=lambda p: p.name)
def test_align_config_parses(config):
    spec, out = parse_spec(["--config", str(config)])
    spec.validate()  # regexes compile with one group, limits and shares are valid
    assert spec.images and spec.texts and out


def test_align_configs_exist_and_a_wrong_key_fails(tmp_path):
    assert ALIGN_CONFIGS
    bad = tmp_path / "bad.yaml"
    bad.write_text(ALIGN_CONFIGS[0].read_text().replace("group_column", "group_col"))
    with pytest.raises(ConfigError, match="group_col"):
        parse_spec(["--config", str(bad)])
