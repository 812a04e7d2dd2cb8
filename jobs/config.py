"""Typed job configuration: dataclasses, YAML presets in ``jobs/configs/``, command-line overrides.

Precedence: command-line override > YAML (``--config PATH`` or ``--config PRESET``) > dataclass defaults.
Parsing goes through jsonargparse, so a typo in a key, a value outside a ``Literal`` or a wrong type fails before
any work starts with a message naming the setting (``Parser key "model.preset": Expected a Literal[...]``);
cross-field rules live in each dataclass's ``__post_init__`` and raise ``ValueError`` naming the field.

    cfg = parse(PretrainConfig, argv, prog="pretrain")     # -> PretrainConfig instance
    cfg = parse(PretrainConfig, overrides, prog="pretrain", preset="tvlt_demo", settings={"data": {"manifest": url}})
    write_resolved(cfg, out_url)                           # config.yaml beside the outputs, secrets masked

The second form is for a job run by another (``jobs/demo.py``): the caller's own values go in as values, between
the preset and the user's overrides.
"""

from __future__ import annotations

import dataclasses
import logging
from argparse import ArgumentError
from pathlib import Path
from collections.abc import Mapping
from typing import Any, TypeVar

import fsspec
import yaml
from jsonargparse import ActionConfigFile, ArgumentParser

from tvlt_core.redaction import redact

log = logging.getLogger(__name__)
PRESETS_DIR = Path(__file__).resolve().parent / "configs"
RESOLVED_NAME = "config.yaml"
T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the setting and what to do."""


def preset_path(name_or_path: str) -> str:
    """``tvlt_tiny`` -> ``jobs/configs/tvlt_tiny.yaml``; an existing path is returned unchanged."""
    if Path(name_or_path).exists() or "/" in name_or_path or name_or_path.endswith((".yaml", ".yml")):
        return name_or_path
    candidate = PRESETS_DIR / f"{name_or_path}.yaml"
    if not candidate.exists():
        known = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
        raise ConfigError(f"--config {name_or_path!r}: no such file or preset; presets: {', '.join(known)}")
    return str(candidate)


def build_parser(config_cls: type, prog: str, description: str | None = None) -> ArgumentParser:
    parser = ArgumentParser(prog=prog, description=description, exit_on_error=False, default_env=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file or preset name in jobs/configs/")
    parser.add_class_arguments(config_cls, nested_key=None, fail_untyped=True)
    return parser


def parse(
    config_cls: type[T], argv: list[str] | None, *, prog: str, description: str | None = None, preset: str = "",
    settings: Mapping[str, Any] | None = None,
) -> T:
    """Parse ``argv`` into a ``config_cls`` instance, or raise ``ConfigError`` naming the bad setting.

    ``preset`` (a name or path, like ``--config``) and ``settings`` (values nested like the YAML and checked like
    it: a wrong key or type fails) come under ``argv``: defaults < preset < settings < argv."""
    base = ["--config", preset_path(preset)] if preset else []
    argv = list(argv or [])
    for i, arg in enumerate(argv):  # let users write a preset name where a path is expected
        if arg == "--config" and i + 1 < len(argv):
            argv[i + 1] = preset_path(argv[i + 1])
        elif arg.startswith("--config="):
            argv[i] = "--config=" + preset_path(arg.split("=", 1)[1])
    parser = build_parser(config_cls, prog, description)
    try:
        namespace = parser.parse_args(base) if base else None
        if settings:
            namespace = parser.parse_object(dict(settings), namespace=namespace)
        namespace = parser.parse_args(argv, namespace=namespace)
        namespace = parser.instantiate_classes(namespace)
        fields = {f.name for f in dataclasses.fields(config_cls)}
        return config_cls(**{k: v for k, v in vars(namespace).items() if k in fields})
    except (ArgumentError, TypeError, ValueError) as e:
        raise ConfigError(f"{prog}: invalid configuration: {e}") from e


def to_dict(cfg: Any) -> dict:
    """The config as plain data with secrets masked: what is logged, written and sent to MLflow."""
    return redact(dataclasses.asdict(cfg))


def dump(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def write_resolved(cfg: Any, folder_url: str, name: str = RESOLVED_NAME) -> str:
    """Write the resolved config (secrets masked) into ``folder_url`` (local or fsspec URL); returns its URL."""
    fs, root = fsspec.core.url_to_fs(folder_url)
    fs.makedirs(root, exist_ok=True)
    url = folder_url.rstrip("/") + "/" + name
    with fsspec.open(url, "w") as f:
        f.write(dump(cfg))
    return url
