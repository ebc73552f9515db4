"""Per-folder settings files, EveryDream style: what `multiply.txt`, `flip_p.txt`,
`cond_dropout.txt`, `batch_id.txt`, `local.yaml` and `global.yaml` say.

Each folder contributes three layers: its `<key>.txt` files, its `local.yaml` and its
`global.yaml`. For a folder's images a key resolves, highest precedence first, from the
folder's `<key>.txt`, then its `local.yaml`, then the nearest `global.yaml` up the tree
(the folder's own included) that sets the key, then the default. Only `global.yaml`
cascades into subfolders: a `multiply.txt` applies to its own folder's images and not to
subfolders, as in EveryDream (doc/BALANCING.md). Called by the scanner.
"""

from __future__ import annotations

import math
import posixpath
from dataclasses import dataclass, fields
from typing import Any

import yaml

from .captions import caption_from_yaml

SETTING_FILES = {
    "multiply.txt": "multiply",
    "flip_p.txt": "flip_p",
    "cond_dropout.txt": "cond_dropout",
    "batch_id.txt": "batch_id",
}
"""Single-value settings files and the key each sets."""
LOCAL_FILES = ("local.yaml", "local.yml")
"""Folder-only YAML settings, highest precedence first."""
GLOBAL_FILES = ("global.yaml", "global.yml")
"""Cascading YAML settings, highest precedence first."""


@dataclass(frozen=True)
class Settings:
    """One layer of settings; None means "not set here"."""

    multiply: float | None = None
    """Times each image is drawn per epoch (>= 0; the fraction is drawn at random)."""
    flip_p: float | None = None
    """Horizontal flip probability in [0, 1]."""
    cond_dropout: float | None = None
    """Probability in [0, 1] of training with an empty caption."""
    batch_id: str | None = None
    """Batch group: images with different ids never share a batch."""
    caption: str | None = None
    """Caption for images without a sidecar (yaml layers only)."""

    def over(self, base: Settings) -> Settings:
        """This layer with unset keys taken from `base`."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return Settings(**{k: v if v is not None else getattr(base, k) for k, v in values.items()})


def parse_value(key: str, raw: object) -> float | str:
    """A setting's value checked for its key. Raises ValueError saying what is wrong."""
    if key == "batch_id":
        if isinstance(raw, bool) or not isinstance(raw, str | int | float) or not str(raw).strip():
            raise ValueError(f"batch_id: expected a non-empty name, got {raw!r}")
        return str(raw).strip()
    shown = raw.strip() if isinstance(raw, str) else raw
    value = math.nan
    if isinstance(raw, str | int | float) and not isinstance(raw, bool):
        try:
            value = float(raw)  # float() ignores surrounding whitespace and newlines
        except ValueError:
            pass
    if not math.isfinite(value):
        raise ValueError(f"{key}: expected a decimal number, got {shown!r}")
    if key == "multiply" and value < 0:
        raise ValueError(f"multiply: must be >= 0, got {shown!r}")
    if key in ("flip_p", "cond_dropout") and not 0 <= value <= 1:
        raise ValueError(f"{key}: must be between 0 and 1, got {shown!r}")
    return value


def settings_from_text(key: str, data: bytes) -> Settings:
    """The layer a `<key>.txt` file sets. Raises ValueError for garbage."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{key}: not UTF-8 text ({exc.reason})") from exc
    values: dict[str, Any] = {key: parse_value(key, text)}
    return Settings(**values)


def load_yaml_mapping(data: bytes) -> dict[str, Any]:
    """A YAML document that must be a mapping (an empty file is an empty mapping)."""
    try:
        doc = yaml.safe_load(data.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 text ({exc.reason})") from exc
    except yaml.YAMLError as exc:
        raise ValueError(f"not valid YAML: {' '.join(str(exc).split())}") from exc
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ValueError(f"expected a mapping of settings, got {type(doc).__name__}")
    return doc


def settings_from_yaml(doc: dict[str, Any]) -> tuple[Settings, list[str]]:
    """The layer a local.yaml / global.yaml sets, and what was wrong in it (bad keys are
    skipped; the good ones still apply). Other EveryDream keys (rating, loss_scale...) are
    ignored."""
    errors: list[str] = []
    values: dict[str, Any] = {}
    for key in ("multiply", "flip_p", "cond_dropout", "batch_id"):
        if doc.get(key) is not None:
            try:
                values[key] = parse_value(key, doc[key])
            except ValueError as exc:
                errors.append(str(exc))
    try:
        values["caption"] = caption_from_yaml(doc)
    except ValueError as exc:
        errors.append(str(exc))
    return Settings(**values), errors


def is_settings_file(name: str) -> bool:
    """Whether a file name is one of the folder settings files."""
    return name in SETTING_FILES or name in LOCAL_FILES or name in GLOBAL_FILES


def _ancestors(folder: str) -> list[str]:
    """The folder and every folder above it, up to the root (''), nearest first."""
    chain = [folder]
    while folder:
        folder = posixpath.dirname(folder)
        chain.append(folder)
    return chain


class SettingsTree:
    """The settings files of one root, resolved per folder by the precedence above."""

    def __init__(self) -> None:
        self._files: dict[tuple[str, str], Settings] = {}

    def add(self, folder: str, name: str, layer: Settings) -> None:
        """Record what the settings file `name` in `folder` sets."""
        self._files[(folder, name)] = layer

    def _merged(self, folder: str, names: tuple[str, ...]) -> Settings:
        merged = Settings()
        for name in reversed(names):  # the first name wins
            merged = self._files.get((folder, name), Settings()).over(merged)
        return merged

    def resolve(self, folder: str) -> Settings:
        """The settings of `folder`'s images: <key>.txt, then local.yaml, then global.yaml up the tree."""
        inherited = Settings()
        for ancestor in reversed(_ancestors(folder)):
            inherited = self._merged(ancestor, GLOBAL_FILES).over(inherited)
        local = self._merged(folder, LOCAL_FILES).over(inherited)
        return self._merged(folder, tuple(SETTING_FILES)).over(local)
