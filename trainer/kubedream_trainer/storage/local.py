"""Local-folder storage: the laptop and test path of the storage interface."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .base import ObjectInfo, Storage, StorageAccessError


class LocalStorage(Storage):
    """A folder on disk. Writes go to a temporary file in the same folder, then `os.replace`."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.root = Path(uri).expanduser()

    def _path(self, key: str) -> Path:
        return self.root / key if key else self.root

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        base = self._path(prefix)
        if base.is_file():
            yield self.stat(prefix)
            return
        if not base.is_dir():
            return
        found: list[ObjectInfo] = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            for name in filenames:
                if name.startswith(".kd-tmp-"):
                    continue
                path = Path(dirpath) / name
                try:
                    st = path.stat()
                except OSError:
                    continue
                key = path.relative_to(self.root).as_posix()
                found.append(ObjectInfo(key, st.st_size, f"{st.st_size}-{st.st_mtime_ns}"))
        yield from sorted(found, key=lambda o: o.key)

    def read_bytes(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def read_range(self, key: str, start: int, length: int) -> bytes:
        with self._path(key).open("rb") as fh:
            fh.seek(start)
            return fh.read(length)

    def write_bytes(self, key: str, data: bytes) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".kd-tmp-", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def upload_file(self, local_path: Path, key: str) -> None:
        target = self._path(key)
        if Path(local_path).resolve() == target.resolve():
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".kd-tmp-", dir=target.parent)
        os.close(fd)
        try:
            shutil.copyfile(local_path, tmp)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def download_file(self, key: str, local_path: Path) -> None:
        local_path = Path(local_path)
        local_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = local_path.with_name(f".kd-tmp-{local_path.name}")
        shutil.copyfile(self._path(key), tmp)
        os.replace(tmp, local_path)

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def stat(self, key: str) -> ObjectInfo:
        st = self._path(key).stat()  # FileNotFoundError when missing
        return ObjectInfo(key, st.st_size, f"{st.st_size}-{st.st_mtime_ns}")

    def check_access(self, require: str | None = None) -> None:
        if require is not None and not self._path(require).exists():
            raise StorageAccessError(f"{self._path(require)} does not exist")

    def delete_prefix(self, prefix: str) -> None:
        path = self._path(prefix)
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
