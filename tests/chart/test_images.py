"""The Dockerfile, checked without a Docker engine: its stages and pins, every path it copies
(present, and inside the .dockerignore allowlist), and the wheel its builder stage makes, built
from exactly that context and installed into a fresh venv whose `kubedream` commands run."""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from kubedream_operator.crd import crd_yaml

from .conftest import ROOT

DOCKERFILE = (ROOT / "Dockerfile").read_text()


def _stages() -> dict[str, str]:
    """Stage name -> its instructions (continuation lines joined)."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE)
    stages: dict[str, str] = {}
    name = ""
    for line in text.splitlines():
        match = re.match(r"FROM\s+(\S+)\s+AS\s+(\S+)", line)
        if match:
            name = match.group(2)
            stages[name] = line + "\n"
        elif name and line.strip() and not line.lstrip().startswith("#"):
            stages[name] += line + "\n"
    return stages


def _arg_default(name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", DOCKERFILE, re.M)
    assert match, f"ARG {name} has no default"
    return match.group(1)


def _context_sources() -> set[str]:
    """Every build-context path the Dockerfile reads (COPY sources, bind-mount sources)."""
    sources: set[str] = set()
    for stage in _stages().values():
        for line in stage.splitlines():
            if line.startswith("COPY") and "--from=" not in line:
                sources.update(line.split()[1:-1])
            for mount in re.findall(r"--mount=(\S+)", line):
                options = dict(part.split("=", 1) for part in mount.split(","))
                if "from" not in options:
                    sources.add(options["source"])
    return {s.rstrip("/") if s not in ("./", ".") else "." for s in sources}


def _ignored(path: str, rules: list[tuple[bool, str]]) -> bool:
    """.dockerignore semantics for the patterns used here: the last matching rule wins, and a
    pattern matches a path or any of its parent folders."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for negated, pattern in rules:
        pattern = pattern.rstrip("/")
        if any(
            fnmatch.fnmatch(c, pattern) or fnmatch.fnmatch(c, pattern.replace("**/", ""))
            for c in candidates
        ):
            ignored = not negated
    return ignored


def _dockerignore() -> list[tuple[bool, str]]:
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            rules.append((line.startswith("!"), line.lstrip("!")))
    return rules


def build_context(target: Path) -> Path:
    """Copy what `docker build` would send (the .dockerignore allowlist) into target."""
    rules = _dockerignore()
    for path in sorted(ROOT.rglob("*")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith((".venv/", ".git/")) or not path.is_file() or _ignored(rel, rules):
            continue
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target / rel)
    return target


def test_two_targets_on_pinned_bases_with_non_root_users() -> None:
    stages = _stages()
    assert set(stages) == {"builder", "operator", "trainer"}
    python, cuda = _arg_default("PYTHON_IMAGE"), _arg_default("CUDA_IMAGE")
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", python)
    assert re.fullmatch(
        r"nvidia/cuda:\d+\.\d+\.\d+-runtime-ubuntu\d+\.\d+(@sha256:[0-9a-f]{64})?", cuda
    )
    assert stages["builder"].startswith("FROM ${PYTHON_IMAGE} AS builder")
    assert stages["operator"].startswith("FROM ${PYTHON_IMAGE} AS operator")
    assert stages["trainer"].startswith("FROM ${CUDA_IMAGE} AS trainer")
    assert 'ENTRYPOINT ["kubedream", "operator"]' in stages["operator"]
    assert 'ENTRYPOINT ["kubedream", "train"]' in stages["trainer"]
    for name in ("operator", "trainer"):
        user = re.findall(r"^USER (\S+)$", stages[name], re.M)
        assert user, f"{name}: no USER"
        assert re.fullmatch(r"[1-9]\d*:[1-9]\d*", user[-1]), (
            f"{name} must run as a numeric non-root user"
        )
        assert "--constraint /constraints.txt" in stages[name]
    # The operator image installs the core package only; torch & co. are the trainer's extra.
    assert "[train]" not in stages["operator"]
    assert "[train]" in stages["trainer"]
    assert "pip wheel --no-deps" in stages["builder"]


def test_every_path_the_dockerfile_reads_exists_and_is_in_the_context() -> None:
    rules = _dockerignore()
    sources = _context_sources()
    assert sources >= {
        "pyproject.toml",
        "README.md",
        "operator",
        "trainer",
        "requirements/constraints.txt",
    }
    for source in sorted(sources):
        assert (ROOT / source).exists(), f"the Dockerfile reads {source}, which does not exist"
        if (ROOT / source).is_file():
            assert not _ignored(source, rules), f".dockerignore leaves out {source}"
    # The context holds the packages and nothing heavy: no venv, tests, data or runs.
    assert _ignored(".venv/bin/python", rules)
    assert _ignored("tests/chart/test_images.py", rules)
    assert _ignored("examples/data/training/stripes.png", rules)
    assert _ignored("operator/kubedream_operator/__pycache__/crd.cpython-311.pyc", rules)
    assert not _ignored("operator/kubedream_operator/crd.py", rules)
    assert not _ignored("trainer/kubedream_trainer/storage/s3.py", rules)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_the_wheel_builds_from_the_context_and_its_commands_run(tmp_path: Path) -> None:
    context = build_context(tmp_path / "context")
    wheels = tmp_path / "wheels"
    # As the builder stage does (without build isolation: no index here; setuptools from .venv).
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
         "--wheel-dir", str(wheels), "."],
        cwd=context, check=True, timeout=180,
    )  # fmt: skip
    (wheel,) = wheels.glob("kubedream-*.whl")
    names = subprocess.run(
        [sys.executable, "-m", "zipfile", "-l", str(wheel)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "kubedream_operator/crd.py" in names
    assert "kubedream_trainer/storage/s3.py" in names
    assert "kubedream_operator/py.typed" in names
    assert "tests/" not in names

    # A fresh venv with the wheel alone; its dependencies come from the project's .venv, read
    # through a .pth file placed after the venv's own site-packages.
    venv = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60
    )
    python = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
         "--no-index", str(wheel)],
        check=True, timeout=120,
    )  # fmt: skip
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    (Path(site) / "zz-project-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    kubedream = venv / "bin" / "kubedream"
    for args in ([], ["operator"], ["train"], ["validate"]):
        proc = subprocess.run(
            [str(kubedream), *args, "--help"], capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, proc.stderr
        assert "usage: kubedream" in proc.stdout
    crd = subprocess.run([str(kubedream), "crd"], capture_output=True, text=True, timeout=60)
    assert crd.returncode == 0, crd.stderr
    assert crd.stdout == crd_yaml()
    # The operator runs from the wheel's code and never imports torch (its image has none).
    probe = subprocess.run(
        [str(python), "-c",
         "import sys, kubedream_operator.main, kubedream_operator.handlers;"
         "print(kubedream_operator.main.__file__); print('torch' in sys.modules)"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert probe.returncode == 0, probe.stderr
    location, torch_loaded = probe.stdout.split()
    assert location.startswith(str(venv)), location
    assert torch_loaded == "False"
