"""Configs: YAML + key=value overrides into frozen, validated schemas; shipped configs all parse."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from pydantic import ValidationError

from cxrray import job_configs
from cxrray.config import (
    LOADER_OPTIONS,
    LOSSES,
    MODELS,
    SOURCES,
    ManifestConfig,
    TrainConfig,
    load_config,
    save_config,
)
from cxrray.schema import ConfigError, build, keys_help

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "jobs" / "configs"
CONFIGS = sorted(CONFIGS_DIR.glob("*.yaml"))
DEMO = CONFIGS_DIR / "synthetic_demo.yaml"


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


# --- the schema: types, ranges, unknown keys, one line per error ----------------------------------


def test_yaml_1_1_exponent_becomes_a_float():
    # YAML 1.1 reads `1e-3` as a string; the float field takes it.
    cfg = load_config(TrainConfig, DEMO, ["lr=1e-3"])
    assert cfg.lr == 0.001 and isinstance(cfg.lr, float)


@pytest.mark.parametrize("override, line", [
    ("lr=abc", "lr: 'abc' is not a number"),
    ("epochs=ten", "epochs: 'ten' is not a whole number"),
    ("epochs=2.5", "epochs: 2.5 is not a whole number"),
    ("epochs=0", "epochs: 0 is out of range (must be >= 1)"),
    ("lr=0", "lr: 0 is out of range (must be > 0)"),
    ("batch_size=0", "batch_size: 0 is out of range (must be >= 1)"),
    ("image_size=4", "image_size: 4 is out of range (must be >= 16)"),
    ("loss=mse", "loss: 'mse' is not one of 'bce', 'weighted_bce', 'focal', 'ce' or 'aucm'"),
    ("scheduler=step", "scheduler: 'step' is not one of 'cosine', 'plateau' or 'none'"),
    ("precision=fp8", "precision: 'fp8' is not one of"),
    ("model=resnet18", "model: 'resnet18' is not one of 'densenet121'"),
    ("placement_strategy=ANY", "placement_strategy: 'ANY' is not one of 'PACK'"),
    ("data_format=tfrecord", "data_format: 'tfrecord' is not one of 'raw' or 'shards'"),
    ("use_gpu=maybe", "use_gpu: 'maybe' is not true or false nor one of 'auto'"),
    ("split=[0.5,0.2,0.2]", "split: [0.5, 0.2, 0.2]: train,valid,test fractions must be >= 0 and sum to 1"),
    ("aug_scale=[0.9,1.5]", "aug_scale: [0.9, 1.5]: needs 0 < low <= high <= 1"),
    ("label_smoothing=0.5", "label_smoothing: 0.5 is out of range (must be < 0.5)"),
    ("label_smoothing=-1", "label_smoothing: -1 is out of range (must be >= 0)"),
    ("epoch=3", "epoch: unknown key (did you mean epochs?); valid keys: "),
    ("source_options={classes: 3}", "source_options: classes: not an option of source 'synthetic'"),
    ("uncertainty={default: U-Maybe}", "uncertainty: unknown uncertainty policy 'U-Maybe'"),
    ("val_labels=all", "val_labels: 'all' is not one of 'certain', 'blank_negative' or 'train'"),
])
def test_bad_values_fail_in_one_line_naming_key_value_and_allowed(override, line):
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, DEMO, [override])
    assert line in str(e.value) and "\n" not in str(e.value)


def test_configs_are_frozen_and_validated_on_replace():
    cfg = load_config(TrainConfig, DEMO)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.epochs = 3  # type: ignore[misc]
    assert dataclasses.replace(cfg, epochs=3).epochs == 3
    with pytest.raises(ValidationError):
        dataclasses.replace(cfg, epochs="ten")


def test_enumerations_match_their_registries():
    from cxrray.imaging import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
    from cxrray.losses import LOSSES as REAL_LOSSES
    from cxrray.models import REGISTRY
    from cxrray.sources import SOURCES as REAL_SOURCES

    assert MODELS == tuple(REGISTRY) and LOSSES == REAL_LOSSES and SOURCES == REAL_SOURCES
    assert (job_configs.DEFAULT_MAX_PIXELS, job_configs.DEFAULT_MAX_BYTES) == (DEFAULT_MAX_PIXELS, DEFAULT_MAX_BYTES)


def test_manifest_options_are_the_loaders_keyword_arguments():
    import inspect

    from cxrray.sources import _LOADERS, load_chexpert

    for source, options in LOADER_OPTIONS.items():
        fn = load_chexpert if source == "synthetic" else _LOADERS[source]
        accepted = {n for n, p in inspect.signature(fn).parameters.items() if p.kind is p.KEYWORD_ONLY}
        assert set(options) <= accepted, (source, set(options) - accepted)


def test_train_source_options_become_the_manifest_config():
    cfg = load_config(TrainConfig, CONFIGS_DIR / "kermany3.yaml")
    m = cfg.manifest_config()
    assert m.source == "kermany" and m.out == cfg.manifest and m.split == cfg.split
    assert m.loader_options() == {"classes": 3}
    demo = load_config(TrainConfig, DEMO).manifest_config().loader_options()
    assert demo["views"] == ["frontal"] and demo["official_split"] is False
    # The uncertainty policy is the training run's, not the manifest's (issue 11).
    assert "uncertainty" not in demo
    assert load_config(TrainConfig, DEMO).uncertainty_policy().default.value == "U-Ones"
    assert load_config(TrainConfig, CONFIGS_DIR / "kermany3.yaml").uncertainty_policy().describe() == \
        "U-Zeros, blank zero"
    with pytest.raises(ConfigError, match="uncertainty: manifests keep the raw 1/0/-1/blank labels"):
        load_config(TrainConfig, DEMO, ["source_options={uncertainty: U-Ones}"])
    with pytest.raises(ConfigError, match="uncertainty: manifests keep the raw"):
        build(ManifestConfig, {"source": "chexpert", "root": "r", "out": "o", "uncertainty": "U-Ones"})
    with pytest.raises(ConfigError, match="source_options: classes: 5 is not one of 2, 3"):
        load_config(TrainConfig, CONFIGS_DIR / "kermany3.yaml", ["source_options={classes: 5}"])


def test_job_schemas_refuse_bad_values():
    with pytest.raises(ValidationError, match="decode"):
        job_configs.ScoreConfig("a", "i", "o", decode="gpu")
    with pytest.raises(ValidationError):
        job_configs.ScoreConfig("a", "i", "o", batch_size=0)
    assert job_configs.ScoreConfig("a", "i", "o", batch_size="8").batch_size == 8
    with pytest.raises(ConfigError, match="split: 'holdout' is not one of 'train', 'valid' or 'test'"):
        build(job_configs.EvaluateConfig, {"artifact": "a", "manifest": "m", "out": "o", "split": "holdout"})
    ev = build(job_configs.EvaluateConfig, {"artifact": "a", "manifest": "m", "out": "o"})
    assert ev.kwargs()["out_dir"] == "o" and "out" not in ev.kwargs()
    with pytest.raises(ConfigError, match="root: --source kermany needs --root"):
        build(job_configs.DemoConfig, {"source": "kermany"})
    with pytest.raises(ConfigError, match="serve args: device: 'tpu'"):
        job_configs.ServeArgs.from_dict({"artifact": "x", "device": "tpu"})


def test_keys_help_lists_every_key_with_its_default():
    text = keys_help(TrainConfig)
    for name in TrainConfig.__pydantic_fields__:
        assert f"\n  {name} " in text
    assert "lr                       default 0.001  peak learning rate" in text


def test_label_smoothing_with_aucm_is_refused_before_ray_starts():
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, DEMO, ["loss=aucm", "label_smoothing=0.1"])
    assert "label_smoothing does not apply to loss 'aucm'" in str(e.value)
    assert load_config(TrainConfig, DEMO, ["label_smoothing=0.1"]).label_smoothing == 0.1
