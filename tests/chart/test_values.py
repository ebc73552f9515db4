"""The chart's values: documented, typed by values.schema.json, closed to unknown keys, and in
step with the package they deploy. Pure: no helm (tests/chart/test_render.py runs helm)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import yaml

from kubedream_operator.render import DEFAULT_TRAINER_IMAGE, OperatorDefaults

from .conftest import CHART, ROOT

VALUES_TEXT = (CHART / "values.yaml").read_text()
VALUES: dict[str, Any] = yaml.safe_load(VALUES_TEXT)
SCHEMA: dict[str, Any] = json.loads((CHART / "values.schema.json").read_text())
CHART_META: dict[str, Any] = yaml.safe_load((CHART / "Chart.yaml").read_text())

# Free-form maps (labels, annotations, node selectors, resource lists): their keys are the
# user's, so the schema types their values instead of listing their keys.
MAPS = {
    "metrics.service.annotations",
    "metrics.serviceMonitor.labels",
    "serviceAccount.annotations",
    "resources.requests",
    "resources.limits",
    "podAnnotations",
    "podLabels",
    "nodeSelector",
}


def _object_nodes(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    if node.get("type") == "object":
        yield path, node
    for name, child in (node.get("properties") or {}).items():
        yield from _object_nodes(child, f"{path}.{name}".lstrip("."))
    if isinstance(node.get("items"), dict):
        yield from _object_nodes(node["items"], f"{path}[]")


def _schema_leaves(node: dict[str, Any], path: str = "") -> set[str]:
    if "properties" in node:
        out: set[str] = set()
        for name, child in node["properties"].items():
            out |= _schema_leaves(child, f"{path}.{name}".lstrip("."))
        return out
    return {path}


def _value_leaves(value: Any, path: str = "") -> set[str]:
    if isinstance(value, dict) and path not in MAPS and value:
        out: set[str] = set()
        for name, child in value.items():
            out |= _value_leaves(child, f"{path}.{name}".lstrip("."))
        return out
    return {path}


def test_every_object_in_the_schema_rejects_unknown_keys() -> None:
    open_objects = []
    for path, node in _object_nodes(SCHEMA):
        extra = node.get("additionalProperties")
        if path in MAPS:
            assert isinstance(extra, dict), f"{path}: a map must type its values"
            assert extra.get("type") or extra.get("oneOf"), f"{path}: a map must type its values"
        elif extra is not False:
            open_objects.append(path or "(root)")
    assert open_objects == []
    assert {path for path, _ in _object_nodes(SCHEMA)} >= MAPS


def test_values_yaml_and_the_schema_name_the_same_keys() -> None:
    assert _value_leaves(VALUES) == _schema_leaves(SCHEMA)


def test_every_value_has_a_comment_and_every_schema_property_a_description() -> None:
    lines = VALUES_TEXT.splitlines()
    documented: set[str] = set()
    stack: list[tuple[int, str]] = []
    undocumented = []
    for number, line in enumerate(lines):
        match = re.match(r"^(\s*)([A-Za-z][A-Za-z0-9]*):(.*)$", line)
        if not match:
            continue
        indent = len(match.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = ".".join([*(key for _, key in stack), match.group(2)])
        stack.append((indent, match.group(2)))
        if number and lines[number - 1].strip().startswith("#"):
            documented.add(path)
        ancestors = {".".join(path.split(".")[:i]) for i in range(1, path.count(".") + 1)}
        # A group header's leaves carry the documentation; a documented map or `resources`
        # value is documented as a whole.
        is_leaf = bool(match.group(3).strip())
        whole = ancestors & documented & (MAPS | {"resources"})
        if is_leaf and path not in documented and not whole:
            undocumented.append(path)
    assert undocumented == []
    # The schema's own descriptions, for editors that show them.
    missing = [
        path
        for path in _schema_leaves(SCHEMA)
        if not _node(path).get("description") and "[]" not in path
    ]
    assert missing == []


def _node(path: str) -> dict[str, Any]:
    node = SCHEMA
    for part in path.split("."):
        node = node["properties"][part]
    return node


def test_chart_and_images_follow_the_package_version() -> None:
    version = re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M)
    assert version is not None
    assert CHART_META["appVersion"] == version.group(1)
    assert CHART_META["name"] == "kubedream"
    # The operator's built-in default and the chart's default name the same trainer image.
    default = f"{VALUES['trainer']['image']['repository']}:{CHART_META['appVersion']}"
    assert default == DEFAULT_TRAINER_IMAGE


def test_security_defaults_match_the_images() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    operator_uid = VALUES["securityContext"]["runAsUser"]
    assert operator_uid == VALUES["securityContext"]["runAsGroup"] == 10001
    assert f"USER {operator_uid}:{operator_uid}" in dockerfile.split("AS operator")[1]
    trainer_uid = OperatorDefaults().run_as_user
    assert f"USER {trainer_uid}:{trainer_uid}" in dockerfile.split("AS trainer")[1]
