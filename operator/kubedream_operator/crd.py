"""The FineTuneJob CustomResourceDefinition, generated from the spec model.

`kubedream crd` prints it; the chart and manifests copy that output, and the bed tests apply
it. The spec schema is the pydantic model's JSON schema (`FineTuneJobSpec`) turned into a
Kubernetes *structural* OpenAPI v3 schema, so there is no second, hand-kept copy of the
fields. What JSON schema cannot say (cross-field rules, set semantics) is added as a few
`x-kubernetes-*` overlays, each keyed by the field path it applies to; `build_crd` fails if a
path no longer exists, so a renamed field cannot silently lose its rule.

Pure: imports neither kopf nor a Kubernetes client.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Mapping
from typing import Any

import yaml

from .spec import GROUP, KIND, PLURAL, SHORT_NAMES, SINGULAR, VERSION, FineTuneJobSpec
from .spec.load import MAX_NAME_LENGTH

CRD_NAME = f"{PLURAL}.{GROUP}"
CATEGORIES = ("kubedream",)

# JSON-schema keywords that mean the same in a Kubernetes structural schema.
_KEPT = (
    "type",
    "description",
    "enum",
    "minimum",
    "maximum",
    "multipleOf",
    "minItems",
    "maxItems",
    "minLength",
    "maxLength",
    "pattern",
    "format",
    "required",
)

# Rules JSON schema cannot express, by field path below `spec` ("" is spec itself).
_OVERLAYS: dict[str, dict[str, Any]] = {
    "training": {
        "x-kubernetes-validations": [
            {
                "rule": "has(self.epochs) || has(self.maxSteps)",
                "message": "set epochs or maxSteps (or both)",
                "fieldPath": ".epochs",
            }
        ]
    },
    # The model rejects a repeated format; a set list does the same in the apiserver.
    "output.formats": {"x-kubernetes-list-type": "set"},
}

# Fields the operator fills from its own settings when a job leaves them unset
# (render.with_storage_defaults). A schema default would make the API server set them on every
# stored object, so the operator could never tell "unset" from "set to the default".
_OPERATOR_DEFAULTED = ("storage.addressingStyle",)

# Pods are named <job>-<index>-<5 chars>; the apiserver enforces the same limit as parse_manifest.
_ROOT_VALIDATIONS = [
    {
        "rule": f"size(self.metadata.name) <= {MAX_NAME_LENGTH}",
        "message": f"metadata.name must be at most {MAX_NAME_LENGTH} characters "
        "(the trainer pods' names add an index and a suffix)",
    }
]


class SchemaConversionError(ValueError):
    """The model uses a JSON-schema construct this converter cannot express structurally."""


def _resolve(node: Mapping[str, Any], defs: Mapping[str, Any]) -> dict[str, Any]:
    """Inline a `$ref`; the referring node's own keys (a field description) win."""
    out = dict(node)
    ref = out.pop("$ref", None)
    if ref is None:
        return out
    prefix = "#/$defs/"
    if not ref.startswith(prefix) or ref[len(prefix) :] not in defs:
        raise SchemaConversionError(f"unresolvable $ref {ref!r}")
    target = _resolve(defs[ref[len(prefix) :]], defs)
    target.update(out)
    return target


def to_structural(
    node: Mapping[str, Any], defs: Mapping[str, Any], path: str = "spec"
) -> dict[str, Any]:
    """Convert one JSON-schema node (pydantic flavour) into a structural OpenAPI v3 node.

    - `$ref` is inlined, `title` dropped.
    - `anyOf: [X, {type: null}]` (an Optional field) becomes X with `nullable: true`, so an
      explicit null is kept rather than pruned (`keepLast: null` means keep all, unlike absent).
      Optional enums are the exception: the API server would reject their null, so they stay
      non-nullable and a null is pruned, which equals absent as their default is None.
    - Draft-2020 numeric `exclusiveMinimum: v` becomes OpenAPI 3.0 `minimum: v, exclusiveMinimum: true`.
    - `additionalProperties: false` next to `properties` is dropped (structural schemas forbid
      it; the apiserver prunes unknown fields and the operator reports them); a schema-valued
      `additionalProperties` (a `dict[str, str]`) is kept.
    - A `default` of null is dropped (absence already means that).
    """
    node = _resolve(node, defs)
    nullable = False
    if "anyOf" in node:
        options = [_resolve(o, defs) for o in node.pop("anyOf")]
        non_null = [o for o in options if o.get("type") != "null"]
        if len(non_null) != 1 or len(options) != 2:
            raise SchemaConversionError(
                f"{path}: only Optional[X] unions are supported, got {options}"
            )
        merged = dict(non_null[0])
        merged.update(node)  # the field's description and default win over the type's
        node = merged
        nullable = True

    out: dict[str, Any] = {key: copy.deepcopy(node[key]) for key in _KEPT if key in node}
    if node.get("default") is not None:
        out["default"] = copy.deepcopy(node["default"])
    for bound, exclusive in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
        if exclusive in node:
            out[bound] = node[exclusive]
            out[exclusive] = True
    if "type" not in out:
        raise SchemaConversionError(f"{path}: every node needs a type, got {node}")
    if nullable and "enum" in out:
        # The API server checks null against the enum even when nullable (and rejects a null
        # in the list). Not nullable, a null is pruned - the same as absent - which is right
        # exactly when the default is None.
        if out.get("default") is not None:
            raise SchemaConversionError(
                f"{path}: an Optional enum needs a None default, got {out['default']!r}"
            )
    elif nullable:
        out["nullable"] = True

    if "properties" in node:
        out["properties"] = {
            name: to_structural(child, defs, f"{path}.{name}")
            for name, child in node["properties"].items()
        }
    elif isinstance(node.get("additionalProperties"), Mapping):
        out["additionalProperties"] = to_structural(node["additionalProperties"], defs, f"{path}.*")
    if "items" in node:
        out["items"] = to_structural(node["items"], defs, f"{path}[]")
    return out


def _at(schema: dict[str, Any], path: str) -> dict[str, Any]:
    node = schema
    for part in filter(None, path.split(".")):
        properties = node.get("properties", {})
        if part not in properties:
            raise SchemaConversionError(
                f"overlay path spec.{path} does not exist in the spec schema"
            )
        node = properties[part]
    return node


def source_default(path: str) -> Any:
    """The model's default of the spec field at `path` (camelCase, dot-separated)."""
    model: Any = FineTuneJobSpec
    for part in path.split("."):
        name = next(n for n, f in model.model_fields.items() if (f.alias or n) == part)
        info = model.model_fields[name]
        model = info.annotation
    return info.get_default(call_default_factory=True)


def spec_schema() -> dict[str, Any]:
    """The structural schema of `spec`, generated from FineTuneJobSpec, with the overlays applied."""
    source = FineTuneJobSpec.model_json_schema(by_alias=True)
    schema = to_structural(source, source.get("$defs", {}))
    for path, extra in _OVERLAYS.items():
        _at(schema, path).update(copy.deepcopy(extra))
    for path in _OPERATOR_DEFAULTED:
        node = _at(schema, path)
        node.pop("default", None)
        node["description"] += f" Absent: the operator's default, else {source_default(path)!r}."
    return schema


def _condition_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["type", "status"],
        "properties": {
            "type": {
                "type": "string",
                "description": "Created, Running, Succeeded, Failed or Suspended.",
            },
            "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
            "reason": {"type": "string", "description": "One CamelCase word for machines."},
            "message": {"type": "string", "description": "What happened, for people."},
            "lastTransitionTime": {"type": "string", "format": "date-time"},
        },
    }


def status_schema() -> dict[str, Any]:
    """The status the operator writes. Unknown fields are kept: kopf stores its state under `status.kopf`."""

    def integer(text: str) -> dict[str, Any]:
        return {"type": "integer", "description": text}

    def number(text: str) -> dict[str, Any]:
        return {"type": "number", "description": text}

    def string(text: str, **extra: Any) -> dict[str, Any]:
        return {"type": "string", "description": text, **extra}

    return {
        "type": "object",
        "description": "Observed state, derived by the operator from the Job, its pods and progress.json.",
        "x-kubernetes-preserve-unknown-fields": True,
        "properties": {
            "phase": string(
                "Pending, Running, Succeeded, Failed or Suspended.",
                enum=["Pending", "Running", "Succeeded", "Failed", "Suspended"],
            ),
            "conditions": {
                "type": "array",
                "description": "Created, Running, Succeeded, Failed and Suspended, each True or False.",
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["type"],
                "items": _condition_schema(),
            },
            "message": string("The latest thing worth telling, e.g. what to fix."),
            "startTime": string("When the trainer Job started.", format="date-time"),
            "completionTime": string("When the trainer Job finished.", format="date-time"),
            "restarts": integer(
                "Trainer pods that failed (each one was replaced, up to the backoff limit)."
            ),
            "worldSize": integer("Training processes: nodes × GPUs per node."),
            "epoch": integer("Current epoch (1-based), from progress.json."),
            "totalEpochs": integer("Epochs in the run."),
            "step": integer("Optimizer steps done."),
            "totalSteps": integer("Optimizer steps in the run."),
            "loss": number("Recent training loss."),
            "imagesPerSecond": number("Training throughput over all processes."),
            "lastCheckpoint": string("URI of the newest committed checkpoint."),
            "checkpoints": {
                "type": "array",
                "description": "URIs of the committed checkpoints that are kept.",
                "items": {"type": "string"},
            },
            "progress": string('Short progress text, e.g. "epoch 3/30".'),
            "observedGeneration": integer("The metadata.generation this status was derived from."),
        },
    }


def printer_columns() -> list[dict[str, Any]]:
    """What `kubectl get finetunejobs` shows."""
    return [
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Progress", "type": "string", "jsonPath": ".status.progress"},
        {"name": "Loss", "type": "number", "jsonPath": ".status.loss"},
        {"name": "Images/s", "type": "number", "jsonPath": ".status.imagesPerSecond"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        {
            "name": "Checkpoint",
            "type": "string",
            "jsonPath": ".status.lastCheckpoint",
            "priority": 1,
        },
        {"name": "Message", "type": "string", "jsonPath": ".status.message", "priority": 1},
    ]


def build_crd() -> dict[str, Any]:
    """The complete apiextensions.k8s.io/v1 CustomResourceDefinition object."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": CRD_NAME,
            "labels": {"app.kubernetes.io/name": "kubedream", "app.kubernetes.io/component": "crd"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": list(SHORT_NAMES),
                "categories": list(CATEGORIES),
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": printer_columns(),
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "A fine-tuning run of a Stable Diffusion model: "
                            "the trainer runs as a Kubernetes Job and reports progress in status.",
                            "required": ["spec"],
                            "x-kubernetes-validations": copy.deepcopy(_ROOT_VALIDATIONS),
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema(),
                                "status": status_schema(),
                            },
                        }
                    },
                }
            ],
        },
    }


def crd_yaml() -> str:
    """The CRD as one YAML document."""
    return yaml.safe_dump(build_crd(), sort_keys=False, width=1000, allow_unicode=True)


def run(args: argparse.Namespace) -> int:
    """`kubedream crd`: print the CRD as YAML on stdout."""
    sys.stdout.write(crd_yaml())
    return 0
