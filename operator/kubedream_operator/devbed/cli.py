"""`kubedream dev up|down|status`: the local test bed from the command line.

Registered in kubedream_trainer.cli; each function takes the parsed arguments and returns the
exit status.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .bed import Bed, BedError, describe
from .build import BuildError
from .layout import DEFAULT_DIR


def _bed(args: argparse.Namespace) -> Bed:
    return Bed(Path(args.dir) if getattr(args, "dir", None) else DEFAULT_DIR)


def up(args: argparse.Namespace) -> int:
    """Start the bed (build the binaries first if needed) and wait until it is healthy."""
    try:
        _bed(args).up()
    except (BedError, BuildError) as exc:
        print(f"kubedream dev up: {exc}", file=sys.stderr)
        return 1
    return 0


def down(args: argparse.Namespace) -> int:
    """Stop every process of the bed, pods included."""
    bed = _bed(args)
    stopped = bed.down()
    print(
        f"stopped: {', '.join(stopped)}" if stopped else f"nothing was running in {bed.layout.dir}"
    )
    return 0


def status(args: argparse.Namespace) -> int:
    """Say what runs; exit 0 only if the whole bed runs."""
    bed = _bed(args)
    print(f"test bed in {bed.layout.dir}:")
    for line in bed.status():
        print(f"  {line}")
    info = bed.info()
    if info is None:
        return 1
    for line in describe(info):
        print(f"  {line}")
    return 0
