"""The CRD is generated from the spec model: structural, complete, and printed by `kubedream crd`."""

from __future__ import annotations

import typing
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from kubedream_operator import crd
from kubedream_operator.spec import FineTuneJobSpec
from kubedream_trainer.cli import main


def _walk(node: dict[str, Any], path: str = "spec") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, child in (node.get("properties") or {}).items():
        yield from _walk(child, f"{path}.{name}")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}.*")
    if "items" in node:
        yield from _walk(node["items"], f"{path}[]")


def _model_paths(model: type[BaseModel], path: str = "spec") -> Iterator[str]:
    """Every field path of the pydantic model, by alias, descending into nested models and lists."""
    for name, info in model.model_fields.items():
        child = f"{path}.{info.alias or name}"
        yield child
        yield from _nested(info.annotation, child)


def _nested(annotation: Any, path: str) -> Iterator[str]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield from _model_paths(annotation, path)
        return
    origin = typing.get_origin(annotation)
    for arg in typing.get_args(annotation):
        yield from _nested(arg, f"{path}[]" if origin is list else path)


@pytest.fixture(scope="module")
def spec_schema() -> dict[str, Any]:
    return crd.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]


def test_names_version_and_subresources() -> None:
    obj = crd.build_crd()
    assert obj["metadata"]["name"] == "finetunejobs.kubedream.io"
    names = obj["spec"]["names"]
    assert (names["kind"], names["plural"], names["shortNames"]) == (
        "FineTuneJob",
        "finetunejobs",
        ["ftj"],
    )
    assert names["categories"] == ["kubedream"]
    [version] = obj["spec"]["versions"]
    assert version["name"] == "v1alpha1"
    assert version["served"]
    assert version["storage"]
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"][:5]] == [
        "Phase",
        "Progress",
        "Loss",
        "Images/s",
        "Age",
    ]


def test_every_model_field_is_in_the_schema(spec_schema: dict[str, Any]) -> None:
    schema_paths = {path for path, _ in _walk(spec_schema)}
    model_paths = set(_model_paths(FineTuneJobSpec))
    assert len(model_paths) > 60  # the walk found the nested models
    assert model_paths - schema_paths == set()


def test_descriptions_come_from_field_docstrings(spec_schema: dict[str, Any]) -> None:
    nodes = dict(_walk(spec_schema))
    assert nodes["spec.training.minSnrGamma"]["description"].startswith(
        "Min-SNR loss weighting gamma"
    )
    assert nodes["spec.model"]["description"] == "Base model."
    missing = [
        path
        for path, node in nodes.items()
        if not node.get("description") and not path.endswith(("*", "[]"))
    ]
    assert missing == []


def test_schema_is_structural(spec_schema: dict[str, Any]) -> None:
    """Every node has a type; no $ref, anyOf, title or additionalProperties beside properties."""
    for path, node in _walk(spec_schema):
        assert "type" in node, path
        assert not {"$ref", "anyOf", "allOf", "oneOf", "title", "$defs"} & set(node), path
        if "properties" in node:
            assert "additionalProperties" not in node, path
        if "exclusiveMinimum" in node:
            assert node["exclusiveMinimum"] is True, path
            assert "minimum" in node, path


def test_constraints_survive(spec_schema: dict[str, Any]) -> None:
    nodes = dict(_walk(spec_schema))
    resolution = nodes["spec.data.resolution"]
    assert (resolution["minimum"], resolution["maximum"], resolution["multipleOf"]) == (
        64,
        4096,
        64,
    )
    assert resolution["default"] == 512
    assert nodes["spec.data.roots"]["minItems"] == 1
    assert nodes["spec.data.roots[].multiplier"] == {
        "type": "number",
        "description": nodes["spec.data.roots[].multiplier"]["description"],
        "default": 1.0,
        "minimum": 0,
        "exclusiveMinimum": True,
    }
    assert nodes["spec.training.ema.decay"]["exclusiveMaximum"] is True
    assert nodes["spec.training.optimizer"]["enum"] == ["adamw", "adamw8bit", "adafactor"]
    assert nodes["spec.resources.nodeSelector"]["additionalProperties"] == {"type": "string"}
    assert nodes["spec.output.formats"]["x-kubernetes-list-type"] == "set"


def test_optional_fields_are_nullable_and_null_defaults_dropped(
    spec_schema: dict[str, Any],
) -> None:
    nodes = dict(_walk(spec_schema))
    keep_last = nodes["spec.output.keepLast"]
    assert keep_last["nullable"] is True
    assert keep_last["default"] == 3
    epochs = nodes["spec.training.epochs"]
    assert epochs["nullable"] is True
    assert "default" not in epochs
    assert nodes["spec.training.ema"]["type"] == "object"
    assert nodes["spec.training.ema"]["nullable"] is True
    effect = nodes["spec.resources.tolerations[].effect"]
    assert (
        "nullable" not in effect
    )  # the API server rejects null in an enum; pruned it means absent
    assert None not in effect["enum"]
    assert "nullable" not in nodes["spec.data.resolution"]


def test_operator_defaulted_fields_have_no_schema_default(spec_schema: dict[str, Any]) -> None:
    """The API server would store a schema default, and the operator's default could never apply."""
    style = dict(_walk(spec_schema))["spec.storage.addressingStyle"]
    assert "default" not in style
    assert style["description"].endswith("Absent: the operator's default, else 'auto'.")


def test_cel_rule_for_training_length(spec_schema: dict[str, Any]) -> None:
    [rule] = spec_schema["properties"]["training"]["x-kubernetes-validations"]
    assert rule["rule"] == "has(self.epochs) || has(self.maxSteps)"


def test_status_schema_keeps_kopf_state_and_lists_our_fields() -> None:
    status = crd.status_schema()
    assert status["x-kubernetes-preserve-unknown-fields"] is True
    for name in (
        "phase",
        "conditions",
        "startTime",
        "completionTime",
        "restarts",
        "worldSize",
        "epoch",
        "totalEpochs",
        "step",
        "totalSteps",
        "loss",
        "imagesPerSecond",
        "lastCheckpoint",
        "checkpoints",
        "progress",
        "message",
        "observedGeneration",
    ):
        assert name in status["properties"], name
    conditions = status["properties"]["conditions"]
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]


def test_unsupported_union_is_reported() -> None:
    node = {"anyOf": [{"type": "string"}, {"type": "integer"}], "title": "X"}
    with pytest.raises(crd.SchemaConversionError, match="only Optional"):
        crd.to_structural(node, {}, "spec.x")


def test_optional_enum_with_a_default_is_refused() -> None:
    node = {"anyOf": [{"enum": ["a", "b"], "type": "string"}, {"type": "null"}], "default": "a"}
    with pytest.raises(crd.SchemaConversionError, match="Optional enum"):
        crd.to_structural(node, {}, "spec.x")


def test_overlay_on_a_missing_path_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(crd._OVERLAYS, "training.noSuchField", {"x-kubernetes-list-type": "set"})
    with pytest.raises(crd.SchemaConversionError, match=r"spec\.training\.noSuchField"):
        crd.spec_schema()


def test_kubedream_crd_prints_the_crd(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["crd"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == crd.build_crd()
