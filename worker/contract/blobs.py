"""Job inputs and results as files in a directory the API and its workers share (CONVQ_BLOB_DIR).

Redis stays the place of every job, model and record; only the big bytes move here. Through
Redis a 32-image AlexNet job's 5 MB of images and 9 MB of pool1 maps cost 18 ms (35 MiB conv1
maps 46 ms) against a 40 ms engine; through a file in the page cache they cost ~2 ms, and the
API sends a result straight from a read-only mapping of its file. Files are written under a
temporary name and renamed, so a reader sees a whole file or none; Redis keeps the TTLs, and
sweep() deletes files whose Redis record can no longer exist.
"""

from __future__ import annotations

import mmap
import os
import re
import secrets
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

NAME = re.compile(r"(input|result)-[0-9A-Za-z_-]{1,64}(\.[0-9]{1,4})?")
"""File names the store makes: input-<job id>, result-<job id>.<output index>."""
_TMP = re.compile(r"\.(?P<name>.+)\.[0-9a-f]{8,16}\.tmp")

SWEEP_MARGIN = 300
"""Seconds past its TTL a file is kept, so a slow reader or a clock step never loses it."""


class BlobDirError(OSError):
    """The blob directory cannot be used (missing, not writable, full)."""


class BlobDir:
    """Files named input-<id> and result-<id>.<i> in one directory, each written whole."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=self.root, prefix=".probe-")  # one per caller
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise BlobDirError(
                f"CONVQ_BLOB_DIR={self.root} cannot be used: {exc.strerror or exc}"
            ) from None

    def _path(self, name: str) -> Path:
        if not NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not a blob name")
        return self.root / name

    def write(self, name: str, parts: Iterable) -> None:
        """Write the buffers in parts, in order, as file name; readers see all of it or none."""
        path = self._path(name)
        # Unique per writer: two runs of one job (a retry racing a presumed-dead attempt) may
        # write the same name at once, each through its own temporary file.
        tmp = path.with_name(f".{name}.{secrets.token_hex(4)}.tmp")
        try:
            with open(tmp, "xb") as f:
                for part in parts:
                    f.write(part)
            os.replace(tmp, path)
        except BaseException as exc:  # a timeout or a bad part too: never leave a tmp file
            tmp.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise BlobDirError(exc.errno, f"{path}: {exc.strerror or exc}") from None
            raise

    def map(self, name: str, *, writable: bool = False) -> mmap.mmap | bytearray | None:
        """Return the file mapped into memory (copy-on-write if writable), or None if missing.

        The mapping stays valid after the file is deleted, so a reader never sees it shrink.
        """
        try:
            fd = os.open(self._path(name), os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            if os.fstat(fd).st_size == 0:
                return bytearray()  # mmap refuses empty files
            return mmap.mmap(fd, 0, access=mmap.ACCESS_COPY if writable else mmap.ACCESS_READ)
        finally:
            os.close(fd)

    def delete(self, *names: str) -> None:
        """Delete the named files; missing ones are fine."""
        for name in names:
            self._path(name).unlink(missing_ok=True)

    def sweep(self, input_ttl: float, result_ttl: float, *, now: float | None = None) -> int:
        """Delete files older than their kind's TTL plus SWEEP_MARGIN; return how many."""
        now = time.time() if now is None else now
        limits = {"input": input_ttl + SWEEP_MARGIN, "result": result_ttl + SWEEP_MARGIN}
        gone = 0
        with os.scandir(self.root) as entries:
            for entry in entries:
                tmp = _TMP.fullmatch(entry.name)
                name = tmp.group("name") if tmp else entry.name
                if not NAME.fullmatch(name) or not entry.is_file(follow_symlinks=False):
                    continue  # not ours: leave it
                limit = max(limits.values()) if tmp else limits[name.split("-", 1)[0]]
                try:
                    if now - entry.stat(follow_symlinks=False).st_mtime > limit:
                        os.unlink(entry.path)
                        gone += 1
                except FileNotFoundError:
                    pass
        return gone
