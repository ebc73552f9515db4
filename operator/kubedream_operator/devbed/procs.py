"""Start and stop the test bed's processes, each in its own process group, tracked by pidfiles.

A pidfile holds the pid and the process's start time (from /proc), so a recycled pid is never
mistaken for ours. Stopping signals the whole group (SIGTERM, then SIGKILL after a grace period)
and waits until no member of the group is left. Linux only (reads /proc), as is the test bed.
Called by devbed.bed and devbed.pod_runner.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

_PROC = Path("/proc")


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name, or None if the process is gone."""
    try:
        raw = (_PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name is parenthesised and may contain spaces; fields resume after the last ')'.
    return raw[raw.rindex(")") + 2 :].split()


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot; None if it is gone or a zombie."""
    fields = _stat_fields(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is `pgid`."""
    members = []
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None and fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


@dataclass(frozen=True)
class Tracked:
    """A process we started: its pid (also its process group id) and start time."""

    pid: int
    started: int

    def alive(self) -> bool:
        """True while the group leader is the process we started and not a zombie."""
        return start_time(self.pid) == self.started

    def group_alive(self) -> bool:
        """True while any member of the process group is left (the leader may be gone)."""
        return self.alive() or bool(group_members(self.pid))


def spawn(
    argv: Sequence[str],
    *,
    log: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> tuple[subprocess.Popen[bytes], Tracked]:
    """Start `argv` as the leader of a new session and process group, stdout and stderr
    appended to `log`. Raises OSError if the program cannot be executed."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
        )
    started = start_time(proc.pid)
    # A program that exits at once leaves no start time to read; record it as already gone.
    return proc, Tracked(proc.pid, started if started is not None else -1)


def write_pidfile(path: Path, tracked: Tracked) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{tracked.pid} {tracked.started}\n")


def read_pidfile(path: Path) -> Tracked | None:
    """The process recorded in `path`, or None if there is no (readable) pidfile."""
    try:
        pid, started = path.read_text().split()
        return Tracked(int(pid), int(started))
    except (FileNotFoundError, ValueError):
        return None


def signal_group(tracked: Tracked, sig: signal.Signals) -> None:
    """Send `sig` to the process group, if any member of it is left."""
    if not tracked.group_alive():
        return
    try:
        os.killpg(tracked.pid, sig)
    except ProcessLookupError:
        pass


def stop_group(
    tracked: Tracked, grace: float = 10.0, popen: subprocess.Popen[bytes] | None = None
) -> None:
    """SIGTERM the process group, SIGKILL what is left after `grace` seconds, and return once the
    group is empty (or after a bounded wait past SIGKILL, which only an unkillable process
    outlives). Reaps `popen`, our own child, so that it does not linger as a zombie."""
    signal_group(tracked, signal.SIGTERM)
    for sig, wait in ((signal.SIGKILL, grace), (None, 5.0)):
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and tracked.group_alive():
            time.sleep(0.05)
        if sig is None or not tracked.group_alive():
            break
        signal_group(tracked, sig)
    if popen is not None:
        try:
            popen.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            pass  # unkillable (uninterruptible sleep); nothing more a test bed can do
