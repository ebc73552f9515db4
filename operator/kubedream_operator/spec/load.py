"""Parse a FineTuneJob manifest and report every problem at once, each with its field path.

Called by `kubedream validate`, `kubedream train`, `kubedream render` and the operator's
handlers. Problems read like `spec.data.roots[1].multiplier: must be > 0, got -1`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from pydantic.alias_generators import to_camel
from pydantic_core import ErrorDetails

from .model import API_VERSION, KIND, LENGTH_MISSING, FineTuneJobSpec

# A Job's pods are named <job>-<index>-<5 random chars>; keep room for that under 63.
MAX_NAME_LENGTH = 52
# Must start with a letter: the name is also the headless Service name of multi-node jobs.
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


class SpecError(ValueError):
    """A FineTuneJob that cannot run. `problems` holds every `path: message` line."""

    def __init__(self, problems: Sequence[str], source: str = "FineTuneJob") -> None:
        self.problems = list(problems)
        self.source = source
        super().__init__(f"{source} is invalid:\n" + "\n".join(f"  {p}" for p in self.problems))

    def report(self, path: object) -> str:
        """What the CLI prints for the manifest at `path`: a heading, then one problem a line."""
        return "\n".join([f"{path}: invalid", *(f"  {p}" for p in self.problems)])


@dataclass(frozen=True)
class FineTuneJob:
    """A parsed manifest: metadata plus the validated spec."""

    name: str
    spec: FineTuneJobSpec
    namespace: str | None = None
    uid: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)


def field_path(loc: Sequence[int | str]) -> str:
    """("spec", "data", "roots", 1, "multiplier") -> "spec.data.roots[1].multiplier"."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _describe(error: ErrorDetails) -> str:
    kind = error["type"]
    ctx: dict[str, Any] = dict(error.get("ctx") or {})
    got = error.get("input")
    bounds = {
        "greater_than": ">",
        "greater_than_equal": ">=",
        "less_than": "<",
        "less_than_equal": "<=",
    }
    if kind in bounds:
        limit = next(iter(ctx.values()))
        if isinstance(limit, float) and limit.is_integer():
            limit = int(limit)
        return f"must be {bounds[kind]} {limit}, got {got!r}"
    if kind == "multiple_of":
        return f"must be a multiple of {ctx['multiple_of']}, got {got!r}"
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        key = str(error["loc"][-1]) if error["loc"] else ""
        if "_" in key and to_camel(key) != key:
            return f"unknown field: did you mean {to_camel(key)!r}? (fields are camelCase)"
        return "unknown field (check the spelling; fields are camelCase)"
    if kind == "literal_error":
        return f"must be one of {ctx['expected']}, got {got!r}"
    if kind == "too_short":
        return f"must have at least {ctx['min_length']} item(s)"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return f"must be an integer, got {got!r}"
    if kind in ("float_parsing", "float_type"):
        return f"must be a number, got {got!r}"
    if kind in ("bool_parsing", "bool_type"):
        return f"must be true or false, got {got!r}"
    if kind in ("string_type",):
        return f"must be a string, got {got!r}"
    if kind in ("list_type",):
        return f"must be a list, got {got!r}"
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return f"must be a mapping, got {got!r}"
    if kind.startswith("kd_"):
        return error["msg"]
    return f"{error['msg']}, got {got!r}"


def problems_from(error: ValidationError, prefix: Sequence[str] = ("spec",)) -> list[str]:
    """Turn a pydantic ValidationError into `path: message` lines (camelCase paths)."""
    lines = []
    for detail in error.errors():
        loc = [*prefix, *detail["loc"]]
        lines.append(f"{field_path(loc)}: {_describe(detail)}")
    return lines


def parse_spec(spec: Any) -> FineTuneJobSpec:
    """Validate a `spec` mapping (as kopf hands it over) into the typed model."""
    if not isinstance(spec, Mapping):
        raise SpecError([f"spec: must be a mapping, got {type(spec).__name__}"])
    try:
        return FineTuneJobSpec.model_validate(
            dict(spec), by_name=False
        )  # camelCase only, as the CRD
    except ValidationError as exc:
        problems = problems_from(exc)
        # The model checks "epochs or maxSteps" only once every training field is valid;
        # report it with the other problems all the same.
        training = spec.get("training")
        if (
            isinstance(training, Mapping)
            and all(training.get(k) is None for k in ("epochs", "maxSteps"))
            and f"spec.training: {LENGTH_MISSING}" not in problems
        ):
            after = [i for i, p in enumerate(problems) if p.startswith("spec.training")]
            problems.insert(
                after[-1] + 1 if after else len(problems), f"spec.training: {LENGTH_MISSING}"
            )
        raise SpecError(problems) from None


def parse_manifest(manifest: Any, source: str = "FineTuneJob") -> FineTuneJob:
    """Validate a whole FineTuneJob manifest (apiVersion, kind, metadata, spec)."""
    problems: list[str] = []
    if not isinstance(manifest, Mapping):
        raise SpecError(
            [f"(document): must be a FineTuneJob mapping, got {type(manifest).__name__}"], source
        )
    if manifest.get("apiVersion") != API_VERSION:
        problems.append(f"apiVersion: must be {API_VERSION!r}, got {manifest.get('apiVersion')!r}")
    if manifest.get("kind") != KIND:
        problems.append(f"kind: must be {KIND!r}, got {manifest.get('kind')!r}")
    metadata = manifest.get("metadata") or {}
    name = metadata.get("name") if isinstance(metadata, Mapping) else None
    if not isinstance(name, str) or not name:
        problems.append("metadata.name: is required")
        name = ""
    elif not _DNS_LABEL.match(name) or len(name) > MAX_NAME_LENGTH:
        problems.append(
            f"metadata.name: must start with a lowercase letter and hold only lowercase letters, digits and '-', at most {MAX_NAME_LENGTH} characters, got {name!r}"
        )
    spec = None
    if "spec" not in manifest:
        problems.append("spec: is required")
    else:
        try:
            spec = parse_spec(manifest["spec"])
        except SpecError as exc:
            problems.extend(exc.problems)
    if problems or spec is None:
        raise SpecError(problems, source)
    return FineTuneJob(
        name=name,
        spec=spec,
        namespace=metadata.get("namespace"),
        uid=metadata.get("uid"),
        labels=dict(metadata.get("labels") or {}),
    )


def load_job(path: str | Path) -> FineTuneJob:
    """Read and validate a FineTuneJob YAML file (the first FineTuneJob document in it)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError([f"{path}: cannot read the file ({exc.strerror})"], str(path)) from None
    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise SpecError([f"{path}: not valid YAML: {exc}"], str(path)) from None
    jobs = [d for d in documents if isinstance(d, Mapping) and d.get("kind") == KIND]
    if not jobs:
        if len(documents) == 1:
            return parse_manifest(documents[0], str(path))
        raise SpecError([f"{path}: holds no document of kind {KIND}"], str(path))
    return parse_manifest(jobs[0], str(path))


def to_manifest(job: FineTuneJob) -> dict[str, Any]:
    """The job as a manifest with camelCase keys and defaults filled in (what the trainer reads)."""
    metadata: dict[str, Any] = {"name": job.name}
    if job.namespace:
        metadata["namespace"] = job.namespace
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": metadata,
        "spec": job.spec.model_dump(mode="json", by_alias=True),
    }
