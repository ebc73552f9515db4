"""`kubedream render JOB.yaml`: print the objects the operator would create, as a YAML stream.

The output is what the operator applies for the same job, with the namespace from the
manifest (or `default`), the operator's defaults from the same environment variables
(KUBEDREAM_TRAINER_IMAGE, KUBEDREAM_S3_*, ...; `kubedream operator --help`) and, unless the
manifest carries one, a placeholder owner uid.
Do not apply it as is: objects owned by a uid that does not exist are garbage-collected.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from typing import Any

import yaml

from .render import (
    UID_PLACEHOLDER,
    Owner,
    defaults_from,
    render_children,
    with_storage_defaults,
)
from .spec import SpecError, load_job


class _Dumper(yaml.SafeDumper):
    """Writes multi-line strings (the ConfigMap's job.yaml) as readable `|` blocks."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def to_yaml_stream(objects: Iterable[dict[str, Any]]) -> str:
    """Objects as a `---`-separated YAML stream, keys in rendering order."""
    return yaml.dump_all(objects, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=1000)


def run(args: argparse.Namespace) -> int:
    """Exit 0 after printing the objects; exit 1 (problems on stderr) for an invalid job."""
    try:
        job = load_job(args.job)
    except SpecError as exc:
        print(exc.report(args.job), file=sys.stderr)
        return 1
    try:
        defaults = defaults_from(args.image)
    except SpecError as exc:
        print(exc.report("environment"), file=sys.stderr)
        return 1
    owner = Owner(
        name=job.name, namespace=job.namespace or "default", uid=job.uid or UID_PLACEHOLDER
    )
    objects = render_children(owner, with_storage_defaults(job.spec, defaults), defaults)
    if owner.uid == UID_PLACEHOLDER:
        sys.stdout.write(
            f"# ownerReferences carry the placeholder uid {UID_PLACEHOLDER}: for reading, not for applying.\n"
        )
    sys.stdout.write(to_yaml_stream(objects))
    return 0
