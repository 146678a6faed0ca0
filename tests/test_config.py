"""Configs: YAML + key=value overrides into frozen dataclasses; shipped configs all parse."""
from __future__ import annotations

from pathlib import Path

import pytest

from cxrray.config import TrainConfig, load_config, save_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "jobs" / "configs").glob("*.yaml"))


def test_overrides_are_typed(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: small_cnn\nepochs: 2\n")
    cfg = load_config(TrainConfig, p, ["epochs=5", "lr=0.01", "labels=[Edema,Cardiomegaly]", "split=[0.7,0.2,0.1]"])
    assert cfg.model == "small_cnn" and cfg.epochs == 5 and cfg.lr == 0.01
    assert cfg.labels == ["Edema", "Cardiomegaly"] and cfg.split == (0.7, 0.2, 0.1)


def test_unknown_key_is_refused_with_the_valid_keys(tmp_path):
    with pytest.raises(ValueError, match="valid keys"):
        load_config(TrainConfig, None, ["epoch=3"])


def test_config_round_trips(tmp_path):
    cfg = load_config(TrainConfig, None, ["epochs=3"])
    again = load_config(TrainConfig, save_config(cfg, tmp_path / "c.yaml"))
    assert again == cfg


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_parse(path):
    cfg = load_config(TrainConfig, path)
    assert cfg.model and cfg.epochs > 0
