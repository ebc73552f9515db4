"""Checkpoints that can be trusted: staged, uploaded, verified, then committed.

A checkpoint is the folder `<output>/checkpoints/step-<N>/`. It exists, for resume and for
rotation, only once its `checkpoint.json` exists, and that file is written last:

  1. everything is written into a local staging folder (see `writer.stage_checkpoint`);
  2. a folder for step N that holds a `checkpoint.json` is never touched again (two trainers
     on one output cannot corrupt a committed checkpoint); one without it is a leftover
     from a crash and is deleted;
  3. every file goes through `Storage.upload_files` (several files at once; on S3 each
     large one in concurrent multipart parts, verified by size and ETag after upload), so
     s3:// outputs work unchanged; a failed upload raises OutputError, nothing is committed;
  4. the uploaded files are checked: sizes from a listing, and sha256 when the output is a
     local folder;
  5. the caller's fence runs (the output lease is still ours), then `checkpoint.json`
     (step, files with sizes and sha256, formats, spec hash, time) is written atomically.

Rotation (`keepLast`) deletes only committed checkpoints older than the newest `keepLast`,
removing `checkpoint.json` first so a half-deleted folder is an uncommitted leftover, never
a damaged checkpoint. Called by `loop`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .errors import OutputError
from .storage import ObjectInfo, Storage, StorageError, join_uri

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
MANIFEST = "checkpoint.json"
MANIFEST_FORMAT = "kubedream.io/checkpoint/v1"
_STEP_DIR = re.compile(r"^checkpoints/step-(\d+)/")
UPLOAD_WORKERS = 4
"""Files uploaded at once (each large one also in concurrent parts, see storage.s3)."""


@dataclass(frozen=True)
class Checkpoint:
    """A committed checkpoint and its manifest."""

    step: int
    key: str
    """Folder key relative to the output root: `checkpoints/step-<N>`."""
    uri: str
    """The folder's full URI (what progress.json reports)."""
    manifest: dict[str, Any]


class CheckpointExistsError(OutputError):
    """Step N is already committed (by an earlier run, or by another trainer)."""


def step_key(step: int) -> str:
    return f"{CHECKPOINTS}/step-{step}"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class CheckpointStore:
    """The `checkpoints/` folder of one output."""

    def __init__(self, output: Storage) -> None:
        self.output = output

    def _step_folders(self) -> dict[int, set[str]]:
        """step -> relative file names, for every step folder (committed or not)."""
        folders: dict[int, set[str]] = {}
        for info in self.output.list(CHECKPOINTS):
            match = _STEP_DIR.match(info.key)
            if match:
                folders.setdefault(int(match.group(1)), set()).add(info.key[match.end() :])
        return folders

    def committed(self) -> list[Checkpoint]:
        """Committed checkpoints, oldest first. An unreadable manifest is skipped with a warning."""
        found = []
        for step, names in sorted(self._step_folders().items()):
            if MANIFEST not in names:
                continue
            key = step_key(step)
            try:
                manifest = json.loads(self.output.read_text(f"{key}/{MANIFEST}"))
            except (OSError, ValueError, StorageError) as exc:
                log.warning("ignoring %s: unreadable %s (%s)", key, MANIFEST, exc)
                continue
            if manifest.get("format") != MANIFEST_FORMAT or manifest.get("step") != step:
                log.warning(
                    "ignoring %s: %s is not a KubeDream checkpoint manifest for step %d",
                    key,
                    MANIFEST,
                    step,
                )
                continue
            found.append(Checkpoint(step, key, join_uri(self.output.uri, key), manifest))
        return found

    def remove_uncommitted(self) -> list[str]:
        """Delete step folders without a manifest (crash leftovers). Call only under the lease."""
        removed = []
        for step, names in sorted(self._step_folders().items()):
            if MANIFEST not in names:
                self.output.delete_prefix(step_key(step) + "/")
                removed.append(step_key(step))
        return removed

    def commit(
        self, step: int, staging: Path, manifest: dict[str, Any], fence: Callable[[], None]
    ) -> Checkpoint:
        """Upload `staging` as step N, verify it, run `fence`, then write the manifest. `fence`
        also runs first: a trainer that lost the output's lease deletes nothing (the step
        folder may be the new holder's upload in progress)."""
        key = step_key(step)
        if self.output.exists(f"{key}/{MANIFEST}"):
            raise CheckpointExistsError(
                f"{join_uri(self.output.uri, key)} is already committed; not touching it"
            )
        fence()
        self.output.delete_prefix(key + "/")
        paths = sorted(p for p in staging.rglob("*") if p.is_file())
        files = [
            {
                "path": path.relative_to(staging).as_posix(),
                "size": path.stat().st_size,
                "sha256": sha256_file(path),
            }
            for path in paths
        ]
        # Largest first, so the big weight files start at once and the small ones fill in.
        uploads = sorted(
            ((path, f"{key}/{entry['path']}") for path, entry in zip(paths, files, strict=True)),
            key=lambda item: -item[0].stat().st_size,
        )
        try:
            self.output.upload_files(uploads, workers=UPLOAD_WORKERS)
        except StorageError as exc:
            raise OutputError(
                f"checkpoint {join_uri(self.output.uri, key)} was not committed: {exc}"
            ) from None
        self._verify(key, files)
        fence()
        full = {
            "format": MANIFEST_FORMAT,
            **manifest,
            "step": step,
            "files": files,
            "createdAt": now_iso(),
        }
        self.output.write_text(f"{key}/{MANIFEST}", json.dumps(full, indent=2) + "\n")
        return Checkpoint(step, key, join_uri(self.output.uri, key), full)

    def _verify(self, key: str, files: list[dict[str, Any]]) -> None:
        """Sizes from a fresh listing; sha256 too when the output is on local disk."""
        listed = {info.key: info.size for info in self.output.list(key)}
        problems = []
        for entry in files:
            name = f"{key}/{entry['path']}"
            if listed.get(name) != entry["size"]:
                problems.append(
                    f"{entry['path']}: size {listed.get(name)} after upload, {entry['size']} staged"
                )
                continue
            local = self.output.local_path(name)
            if local is not None and sha256_file(local) != entry["sha256"]:
                problems.append(f"{entry['path']}: sha256 differs after upload")
        if problems:
            raise OutputError(
                f"checkpoint {join_uri(self.output.uri, key)} did not verify: "
                + "; ".join(problems)
            )

    def verify_committed(self, checkpoint: Checkpoint, prefix: str = "") -> list[str]:
        """Problems with a committed checkpoint's files under `prefix` (sizes; sha256 when local)."""
        files = [f for f in checkpoint.manifest.get("files", []) if f["path"].startswith(prefix)]
        if not files:
            return [f"its manifest lists no files under {prefix or '/'}"]
        try:
            self._verify(checkpoint.key, files)
        except OutputError as exc:
            return [exc.message]
        return []

    def latest_resumable(self, state_prefix: str) -> Checkpoint | None:
        """The newest committed checkpoint whose `state_prefix` files verify; a damaged one is
        skipped with a warning (and left in place for inspection)."""
        for checkpoint in reversed(self.committed()):
            problems = self.verify_committed(checkpoint, state_prefix)
            if not problems:
                return checkpoint
            log.warning("not resuming from %s: %s", checkpoint.uri, "; ".join(problems))
        return None

    def rotate(self, keep_last: int | None) -> list[str]:
        """Delete committed checkpoints beyond the newest `keep_last`; returns their keys."""
        if keep_last is None:
            return []
        committed = self.committed()
        doomed = committed[: max(0, len(committed) - max(1, keep_last))]
        for checkpoint in doomed:
            self.output.delete_prefix(f"{checkpoint.key}/{MANIFEST}")
            self.output.delete_prefix(checkpoint.key + "/")
        return [c.key for c in doomed]

    def fetch(self, checkpoint: Checkpoint, prefix: str, into: Path) -> Path:
        """A local folder holding `prefix` of the checkpoint (the output's own folder when local).
        Remote files download several at once and must match the manifest's sha256."""
        local = self.output.local_path(checkpoint.key)
        if local is not None:
            return local
        recorded = {entry["path"]: entry for entry in checkpoint.manifest.get("files", [])}

        def download(info: ObjectInfo) -> None:
            relative = info.key[len(checkpoint.key) + 1 :]
            self.output.download_file(info.key, into / relative)
            entry = recorded.get(relative)
            if entry is not None and sha256_file(into / relative) != entry["sha256"]:
                raise OutputError(
                    f"{join_uri(self.output.uri, info.key)}: sha256 after download differs from "
                    f"its {MANIFEST}; the checkpoint was changed after it was committed"
                )

        with ThreadPoolExecutor(UPLOAD_WORKERS, thread_name_prefix="kd-fetch") as pool:
            list(pool.map(download, self.output.list(f"{checkpoint.key}/{prefix}")))
        return into
