"""The FineTuneJob spec model: defaults, every problem reported at once, field paths."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubedream_operator.spec import SpecError, load_job, parse_manifest, to_manifest
from kubedream_trainer.cli import main

VALID: dict[str, Any] = {
    "apiVersion": "kubedream.io/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "bob", "namespace": "team"},
    "spec": {
        "model": {"base": "s3://models/sd15"},
        "data": {"roots": [{"uri": "s3://data/bob"}, {"uri": "/data/pres", "multiplier": 0.5}]},
        "training": {"epochs": 10},
        "output": {"uri": "s3://out/bob"},
    },
}


def with_change(path: str, value: Any) -> dict[str, Any]:
    """A copy of VALID with one dotted path set (list items as [i])."""
    doc = copy.deepcopy(VALID)
    node: Any = doc
    parts = path.replace("[", ".").replace("]", "").split(".")
    for part in parts[:-1]:
        node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
    last = parts[-1]
    if value is DELETE:
        del node[last]
    elif last.isdigit():
        node[int(last)] = value
    else:
        node[last] = value
    return doc


DELETE = object()


def problems(doc: dict[str, Any]) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_manifest(doc)
    return info.value.problems


def test_valid_job_gets_defaults() -> None:
    job = parse_manifest(VALID)
    assert job.name == "bob"
    assert job.namespace == "team"
    spec = job.spec
    assert spec.model.family == "auto"
    assert spec.model.prediction_type == "auto"
    assert spec.data.resolution == 512
    assert spec.data.roots[0].multiplier == 1.0
    assert spec.data.roots[1].multiplier == 0.5
    assert spec.training.batch_size == 1
    assert spec.training.text_encoder_learning_rate is None
    assert spec.output.formats == ["diffusers", "safetensors"]
    assert spec.resources.nodes == 1
    assert spec.run_policy.backoff_limit == 3


def test_spec_is_frozen() -> None:
    job = parse_manifest(VALID)
    with pytest.raises(ValueError, match="frozen"):
        job.spec.training.epochs = 3  # type: ignore[misc]


def test_round_trip_through_manifest_keeps_camel_case() -> None:
    manifest = to_manifest(parse_manifest(VALID))
    assert manifest["spec"]["training"]["batchSize"] == 1
    assert manifest["spec"]["runPolicy"]["backoffLimit"] == 3
    assert parse_manifest(manifest).spec == parse_manifest(VALID).spec


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("spec.data.roots[1].multiplier", -1, "spec.data.roots[1].multiplier: must be > 0, got -1"),
        ("spec.data.roots[0].multiplier", 0, "spec.data.roots[0].multiplier: must be > 0, got 0"),
        ("spec.data.resolution", 500, "spec.data.resolution: must be a multiple of 64, got 500"),
        ("spec.data.resolution", 0, "spec.data.resolution: must be >= 64, got 0"),
        ("spec.data.flipP", 1.5, "spec.data.flipP: must be <= 1, got 1.5"),
        ("spec.data.roots", [], "spec.data.roots: must have at least 1 item(s)"),
        (
            "spec.data.roots[0].uri",
            "gs://bucket/x",
            "spec.data.roots[0].uri: must be a local path or s3://bucket/prefix, got 'gs://bucket/x'",
        ),
        ("spec.data.roots[0].uri", "s3://B/x", "spec.data.roots[0].uri: not a valid S3 URI"),
        (
            "spec.model.family",
            "sd3",
            "spec.model.family: must be one of 'auto', 'sd1', 'sd2' or 'sdxl', got 'sd3'",
        ),
        ("spec.model.predictionType", "sample", "spec.model.predictionType: must be one of"),
        ("spec.model.base", DELETE, "spec.model.base: is required"),
        ("spec.training.batchSize", 0, "spec.training.batchSize: must be >= 1, got 0"),
        (
            "spec.training.batchSize",
            "big",
            "spec.training.batchSize: must be an integer, got 'big'",
        ),
        ("spec.training.unetLearningRate", 0, "spec.training.unetLearningRate: must be > 0, got 0"),
        ("spec.training.lrScheduler", "step", "spec.training.lrScheduler: must be one of"),
        ("spec.training.optimizer", "sgd", "spec.training.optimizer: must be one of"),
        ("spec.training.mixedPrecision", "fp8", "spec.training.mixedPrecision: must be one of"),
        ("spec.training.epochs", DELETE, "spec.training: set epochs or maxSteps (or both)"),
        ("spec.training.ema", {"decay": 1.0}, "spec.training.ema.decay: must be < 1, got 1.0"),
        ("spec.training.minSnrGamma", -5, "spec.training.minSnrGamma: must be > 0, got -5"),
        ("spec.training.learningRate", 1e-6, "spec.training.learningRate: unknown field"),
        (  # the CRD only knows camelCase: so does `kubedream validate` / `train`
            "spec.training.batch_size",
            2,
            "spec.training.batch_size: unknown field: did you mean 'batchSize'?",
        ),
        ("spec.output.uri", DELETE, "spec.output.uri: is required"),
        (
            "spec.output.formats",
            ["ckpt"],
            "spec.output.formats[0]: must be one of 'diffusers' or 'safetensors', got 'ckpt'",
        ),
        (
            "spec.output.formats",
            ["diffusers", "diffusers"],
            "spec.output.formats: must not repeat a format",
        ),
        ("spec.output.keepLast", 0, "spec.output.keepLast: must be >= 1, got 0"),
        (
            "spec.storage.endpoint",
            "minio:9000",
            "spec.storage.endpoint: must be an http:// or https:// URL",
        ),
        ("spec.storage.addressingStyle", "dns", "spec.storage.addressingStyle: must be one of"),
        ("spec.resources.memory", "lots", "spec.resources.memory: must be a Kubernetes quantity"),
        ("spec.resources.nodes", 0, "spec.resources.nodes: must be >= 1, got 0"),
        (
            "spec.resources.tolerations",
            [{"operator": "Maybe"}],
            "spec.resources.tolerations[0].operator: must be one of",
        ),
        ("spec.runPolicy.backoffLimit", -1, "spec.runPolicy.backoffLimit: must be >= 0, got -1"),
        ("spec.samples.steps", 0, "spec.samples.steps: must be >= 1, got 0"),
        ("metadata.name", "Bob_Smith", "metadata.name: must start with a lowercase letter"),
        ("metadata.name", "x" * 60, "metadata.name: must start with a lowercase letter"),
        ("apiVersion", "kubedream.io/v1", "apiVersion: must be 'kubedream.io/v1alpha1'"),
        ("kind", "Job", "kind: must be 'FineTuneJob'"),
        ("spec", "nope", "spec: must be a mapping"),
    ],
)
def test_invalid_field_reports_its_path(path: str, value: Any, expected: str) -> None:
    found = problems(with_change(path, value))
    assert any(p.startswith(expected) for p in found), found


def test_every_problem_is_reported_at_once() -> None:
    doc = with_change("spec.data.roots[1].multiplier", -1)
    doc["spec"]["training"]["batchSize"] = 0
    doc["spec"]["output"]["keepLast"] = 0
    doc["spec"]["model"]["family"] = "sd3"
    found = problems(doc)
    assert [p.split(":")[0] for p in found] == [
        "spec.model.family",
        "spec.data.roots[1].multiplier",
        "spec.training.batchSize",
        "spec.output.keepLast",
    ]


def test_a_missing_length_is_reported_with_the_other_training_problems() -> None:
    doc = with_change("spec.training.epochs", DELETE)
    doc["spec"]["training"].pop("maxSteps", None)
    doc["spec"]["training"]["batchSize"] = 0
    doc["spec"]["output"]["keepLast"] = 0
    assert problems(doc) == [
        "spec.training.batchSize: must be >= 1, got 0",
        "spec.training: set epochs or maxSteps (or both)",
        "spec.output.keepLast: must be >= 1, got 0",
    ]


def test_fsdp_refuses_fp16() -> None:
    doc = with_change("spec.training.dataParallel", "fsdp")
    doc["spec"]["training"]["mixedPrecision"] = "fp16"
    assert problems(doc) == [
        "spec.training: dataParallel fsdp trains in bf16 or fp32: "
        "set mixedPrecision to bf16, no or auto"
    ]
    doc["spec"]["training"]["mixedPrecision"] = "bf16"
    assert parse_manifest(doc).spec.training.data_parallel == "fsdp"


def test_validate_command_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(VALID))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(with_change("spec.data.roots[1].multiplier", -1)))

    assert main(["validate", str(good)]) == 0
    assert "is valid" in capsys.readouterr().out

    assert main(["validate", str(good), str(bad)]) == 1
    err = capsys.readouterr().err
    assert "spec.data.roots[1].multiplier: must be > 0, got -1" in err


def test_load_job_reports_unreadable_and_non_yaml(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="cannot read the file"):
        load_job(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("spec: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_job(broken)


def test_load_job_picks_the_finetunejob_from_a_stream(tmp_path: Path) -> None:
    stream = tmp_path / "all.yaml"
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3"}}
    stream.write_text(yaml.safe_dump_all([secret, VALID]))
    assert load_job(stream).name == "bob"


def test_name_must_start_with_a_letter() -> None:
    assert any(
        p.startswith("metadata.name:") for p in problems(with_change("metadata.name", "1job"))
    )


def test_explicit_nulls_survive_the_manifest_round_trip() -> None:
    doc = with_change("spec.output.keepLast", None)
    doc["spec"]["training"]["maxGradNorm"] = None
    manifest = to_manifest(parse_manifest(doc))
    again = parse_manifest(manifest).spec
    assert again.output.keep_last is None
    assert again.training.max_grad_norm is None
