"""Typed job configuration: YAML presets, CLI precedence, errors that name the setting, secrets masked."""

from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml

from jobs.config import ConfigError, dump, parse, preset_path, write_resolved
from tvlt_core.redaction import REDACTED, redact, redact_text


@dataclass
class ModelSection:
    preset: Literal["tiny", "base"] = "tiny"
    hidden: int = 8

    def __post_init__(self):
        if self.hidden <= 0:
            raise ValueError(f"model.hidden must be positive, got {self.hidden}")


@dataclass
class StoreSection:
    url: str = "s3://bucket/out"
    aws_secret_access_key: str = ""


@dataclass
class ToyConfig:
    model: ModelSection = field(default_factory=ModelSection)
    store: StoreSection = field(default_factory=StoreSection)
    seed: int = 0


def test_precedence_cli_over_yaml_over_defaults(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("model:\n  preset: base\n  hidden: 32\nseed: 3\n")
    cfg = parse(ToyConfig, ["--config", str(preset), "--model.hidden", "64"], prog="toy")
    assert isinstance(cfg, ToyConfig) and isinstance(cfg.model, ModelSection)
    assert (cfg.model.preset, cfg.model.hidden, cfg.seed) == ("base", 64, 3)
    assert parse(ToyConfig, [], prog="toy") == ToyConfig()


def test_a_calling_jobs_settings_sit_between_the_preset_and_the_command_line(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("model:\n  preset: base\n  hidden: 32\nseed: 3\nstore:\n  url: s3://preset\n")
    settings = {"store": {"url": "s3://caller"}, "seed": 4}
    cfg = parse(ToyConfig, ["--seed", "5"], prog="toy", preset=str(preset), settings=settings)
    assert (cfg.model.preset, cfg.model.hidden, cfg.store.url, cfg.seed) == ("base", 32, "s3://caller", 5)
    assert parse(ToyConfig, [], prog="toy", settings={"model": {"hidden": 16}}).model == ModelSection(hidden=16)
    with pytest.raises(ConfigError, match="hiden"):
        parse(ToyConfig, [], prog="toy", settings={"model": {"hiden": 16}})
    with pytest.raises(ConfigError, match="seed"):
        parse(ToyConfig, [], prog="toy", settings={"seed": "three"})


@pytest.mark.parametrize(
    "argv, names",
    [
        (["--model.preset", "huge"], ["model.preset", "tiny", "base"]),  # Literal: lists the allowed values
        (["--model.hidden", "0"], ["model.hidden"]),  # cross-field / range rule in __post_init__
        (["--model.hiden", "3"], ["hiden"]),  # typo in a key is an error, not silently ignored
        (["--seed", "three"], ["seed"]),
    ],
)
def test_bad_settings_fail_naming_the_setting(argv, names):
    with pytest.raises(ConfigError) as err:
        parse(ToyConfig, argv, prog="toy")
    for name in names:
        assert name in str(err.value)


def test_typo_in_yaml_fails(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("model:\n  hiddden: 3\n")
    with pytest.raises(ConfigError, match="hiddden"):
        parse(ToyConfig, ["--config", str(preset)], prog="toy")


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ConfigError, match="presets:"):
        preset_path("no_such_preset")


def test_resolved_config_is_written_with_secrets_masked(tmp_path):
    cfg = parse(
        ToyConfig,
        ["--store.url", "s3://ak:hunter2@minio:9000/b", "--store.aws_secret_access_key", "hunter2"],
        prog="toy",
    )
    url = write_resolved(cfg, str(tmp_path / "run"))
    text = open(url).read()
    assert "hunter2" not in text and "hunter2" not in dump(cfg)
    data = yaml.safe_load(text)
    assert data["store"]["aws_secret_access_key"] == REDACTED
    assert data["store"]["url"] == f"s3://ak:{REDACTED}@minio:9000/b"
    assert data["model"] == {"preset": "tiny", "hidden": 8}


def test_redaction_rules():
    assert redact_text("http://u:p@host/x?X-Amz-Signature=abc&y=1") == f"http://u:{REDACTED}@host/x?X-Amz-Signature={REDACTED}&y=1"
    assert redact({"tracking_token": "t", "nested": {"password": "p", "port": 5}, "empty_token": ""}) == {
        "tracking_token": REDACTED,
        "nested": {"password": REDACTED, "port": 5},
        "empty_token": "",
    }
