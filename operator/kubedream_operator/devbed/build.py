"""Find, and build when missing, the test bed's Go binaries.

The build itself is scripts/build-testbed.sh (also run by `make testbed-bins`); this module runs
it and asks it where each binary lives, so the cache layout is defined in one place. Called by
the bed (`kubedream dev up`) and by the `bed` pytest fixture.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

# operator/kubedream_operator/devbed/build.py -> repository root
REPO_ROOT = Path(__file__).resolve().parents[3]
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build-testbed.sh"


class BuildError(RuntimeError):
    """The binaries are missing and could not be built; the message says why."""


@dataclass(frozen=True)
class Binaries:
    """Absolute paths of the test bed's programs."""

    etcd: Path
    kube_apiserver: Path
    kube_controller_manager: Path
    minio: Path
    helm: Path

    def missing(self) -> list[Path]:
        """The paths that are not executable files yet."""
        return [p for p in self.__dict__.values() if not p.is_file()]


def _run_script(*args: str, capture: bool) -> str:
    if not BUILD_SCRIPT.is_file():
        raise BuildError(f"{BUILD_SCRIPT} not found: the test bed needs a source checkout")
    proc = subprocess.run(
        ["bash", str(BUILD_SCRIPT), *args],
        stdout=subprocess.PIPE if capture else None,
        stderr=subprocess.PIPE if capture else None,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        detail = (proc.stderr or "").strip() if capture else "see the output above"
        raise BuildError(f"{BUILD_SCRIPT.name} {' '.join(args)} failed: {detail}")
    return proc.stdout or ""


def binary_paths() -> Binaries:
    """Where the binaries are (or will be) cached; builds nothing."""
    paths: dict[str, Path] = {}
    for line in _run_script("--print-paths", capture=True).splitlines():
        name, _, path = line.partition(" ")
        paths[name.replace("-", "_")] = Path(path)
    return Binaries(**paths)


def ensure_binaries(*, build: bool = True) -> Binaries:
    """Return the binaries, building the missing ones first (this can take a long while cold;
    the script prints progress). With build=False, raise BuildError if any is missing."""
    binaries = binary_paths()
    if binaries.missing():
        if not build:
            names = ", ".join(p.name for p in binaries.missing())
            raise BuildError(f"not built yet: {names}; run `make testbed-bins`")
        _run_script(capture=False)
        if binaries.missing():
            raise BuildError(f"build finished but still missing: {binaries.missing()}")
    return binaries
