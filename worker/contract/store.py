"""Blobs under "convq:" keys: models, job inputs and job results.

Arrays are stored as .npy bytes (never pickled) or, for results, as raw C-order bytes with their
shape and dtype in an index; weights are safetensors bytes. Inputs and results carry TTLs; a
model lives until it is unloaded, and a replaced version's weights linger only long enough for
jobs already queued on it. Big values are written from a memoryview (no copy) and read in
GETRANGE slices: redis-py reads one 37 MB bulk reply in ~90 ms, 2 MiB slices in ~15 ms.

With a blob directory (CONVQ_BLOB_DIR, see blobs.py) the bytes of inputs and results are files
there instead, and Redis holds their names under the same keys and TTLs: the input key's value
is b"file:<name>", a result index entry has "file" in place of "key".
"""

from __future__ import annotations

import functools
import json
import threading
import time
from collections.abc import Iterator
from typing import Any, cast

import numpy as np

from engine.npy import from_npy, npy_header, to_npy

from . import defaults, keys
from .blobs import BlobDir
from .connection import bulk_client

_NAMES_FIELD = b"__names__"
_INDEX_FIELD = b"__index__"
_FILE_REF = b"file:"
SLICE_BYTES = 2 << 20
"""Bytes per GETRANGE when reading a big value (measured best with 1 MiB socket reads)."""
FILE_SLICE_BYTES = 4 << 20
"""Bytes per piece of a result sent from its mapped file."""


class BlobMissing(LookupError):
    """Redis names a blob file that this process cannot find in its blob directory."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name


class NameTaken(Exception):
    """A model name is held by another owner."""

    def __init__(self, name: str):
        super().__init__(f"model name {name!r} is held by another owner")
        self.name = name


BYTES = "BYTES"
"""The dtype a result index gives an output of byte strings (V2's BYTES, e.g. PNG pictures)."""


def bytes_tensor(strings: np.ndarray) -> bytes:
    """Return an object array of byte strings in V2's BYTES layout: per element, in C order,
    its length as a 4-byte little-endian integer, then its bytes."""
    return b"".join(len(s).to_bytes(4, "little") + bytes(s) for s in strings.ravel())


def from_bytes_tensor(raw, shape) -> np.ndarray:
    """Return the object array of byte strings bytes_tensor made, reshaped to shape."""
    view, items, offset = memoryview(raw), [], 0
    while offset < len(view):
        size = int.from_bytes(view[offset : offset + 4], "little")
        items.append(bytes(view[offset + 4 : offset + 4 + size]))
        offset += 4 + size
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out.reshape(shape)


def _dtype(entry: dict) -> np.dtype:
    return np.dtype(object) if entry["dtype"] == BYTES else np.dtype(entry["dtype"])


def _size(entry: dict) -> int:
    if entry["dtype"] == BYTES:
        return int(entry["size"])
    return int(np.prod(entry["shape"], dtype=np.int64)) * np.dtype(entry["dtype"]).itemsize


SPEC_CACHE = 256
"""Model specs (name, version) a Store keeps read; each is immutable once written."""


@functools.lru_cache(maxsize=8)
def _blob_dir(path: str) -> BlobDir:
    return BlobDir(path)  # checked once per process and path


class Store:
    """Models, inputs and results of convq jobs, as Redis keys named by keys.py."""

    def __init__(
        self,
        redis,
        *,
        result_ttl: int = defaults.RESULT_TTL,
        input_ttl: int = defaults.INPUT_TTL,
        old_version_ttl: int | None = None,
        blob_dir: str | None = None,
    ):
        self.redis = redis
        self.result_ttl = result_ttl
        self.input_ttl = input_ttl
        # A replaced version must outlive the jobs already queued on it.
        self.old_version_ttl = old_version_ttl or input_ttl
        self.blobs = _blob_dir(str(blob_dir)) if blob_dir else None
        self._specs: dict[tuple[str, int], bytes] = {}  # (name, version) -> raw spec
        self._specs_lock = threading.Lock()

    @classmethod
    def from_settings(cls, redis, settings) -> Store:
        """Return the store a worker or the API uses with settings (TTLs, blob directory)."""
        return cls(
            redis,
            result_ttl=settings.result_ttl,
            input_ttl=settings.input_ttl,
            blob_dir=settings.blob_dir,
        )

    def _blobs_for(self, name: str) -> BlobDir:
        if self.blobs is None:
            raise BlobMissing(
                name,
                f"{name} is a file in a blob directory, and this process "
                "has no CONVQ_BLOB_DIR; the API and every worker must share one",
            )
        return self.blobs

    def _map(self, name: str, *, writable: bool):
        blobs = self._blobs_for(name)
        data = blobs.map(name, writable=writable)
        if data is None:
            raise BlobMissing(
                name,
                f"{name} is not in CONVQ_BLOB_DIR={blobs.root} (the "
                "API and every worker must share that directory)",
            )
        return data

    # -- keys (all built by keys.py) ------------------------------------------------------------
    def input_key(self, job_id: str) -> str:
        return keys.job_input(job_id)

    def result_key(self, job_id: str) -> str:
        return keys.result(job_id)

    def cancel_key(self, job_id: str) -> str:
        return keys.cancel(job_id)

    # -- models ---------------------------------------------------------------------------------
    def put_model(self, name: str, spec: dict, weights: bytes, *, owner: str | None) -> int:
        """Store spec + safetensors weights as the next version of name; return that version.

        The name is claimed in the same transaction (WATCH on the model's record): if another
        owner (or the server) holds it, or takes it while this one writes, NameTaken and nothing
        is written. The server's own uploads (owner None) may take any name.
        """
        # The counter outlives delete_model, so a name+version never means two different models.
        version = int(self.redis.incr(keys.model_version(name)))
        model_key = keys.model(name)
        info = {
            "name": name,
            "version": version,
            "owner": owner or "",
            "weights_bytes": len(weights),
            "created": time.time(),
        }

        def write(pipe) -> None:
            held, previous = pipe.hmget(model_key, "owner", "version")
            if owner is not None and held is not None and (json.loads(held) or None) != owner:
                raise NameTaken(name)  # the server (owner None) may take any name
            pipe.multi()
            pipe.set(keys.weights(name, version), weights)
            pipe.set(keys.spec(name, version), json.dumps(spec))
            pipe.hset(model_key, mapping={k: json.dumps(v) for k, v in info.items()})
            pipe.sadd(keys.models(), name)
            if previous is not None:
                self._expire_version(pipe, name, int(previous))

        self.redis.transaction(write, model_key)
        return version

    def _expire_version(self, pipe, name: str, version: int) -> None:
        pipe.expire(keys.weights(name, version), self.old_version_ttl)
        pipe.expire(keys.spec(name, version), self.old_version_ttl)

    def model_info(self, name: str) -> dict | None:
        """Return {name, version, spec, owner, weights_bytes, created} of the live version."""
        return self.model_infos([name])[0]

    def model_infos(self, names: list[str]) -> list[dict | None]:
        """Return model_info of each name (None where there is none), in one round trip when
        the specs of their live versions were read before (a version's spec never changes:
        put_model never reuses a version number, so they are kept by name and version)."""
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.hgetall(keys.model(name))
        infos: list[dict | None] = []
        missing: list[tuple[str, int]] = []
        for name, raw in zip(names, pipe.execute(), strict=True):
            if not raw:
                infos.append(None)
                continue
            info = {k.decode(): json.loads(v) for k, v in raw.items()}
            info["owner"] = info.get("owner") or None
            infos.append(info)
            if (name, int(info["version"])) not in self._specs:
                missing.append((name, int(info["version"])))
        if missing:
            found = self.redis.mget([keys.spec(name, version) for name, version in missing])
            for key, raw_spec in zip(missing, found, strict=True):
                if raw_spec is not None:
                    self._keep_spec(key, raw_spec)
        for i, (name, found) in enumerate(zip(names, infos, strict=True)):
            if found is None:
                continue
            kept = self._specs.get((name, int(found["version"])))
            if kept is None:
                infos[i] = None  # the version's spec is gone: as good as no model
            else:
                found["spec"] = json.loads(kept)  # a fresh dict each time
        return infos

    def _keep_spec(self, key: tuple[str, int], raw: bytes) -> None:
        with self._specs_lock:  # API threads share the store
            if len(self._specs) >= SPEC_CACHE:
                self._specs.pop(next(iter(self._specs)))  # the oldest
            self._specs[key] = raw

    def model_spec(self, name: str, version: int) -> dict | None:
        """Return the spec of one version, or None when it is gone."""
        raw = self.redis.get(keys.spec(name, version))
        return None if raw is None else json.loads(raw)

    def list_models(self) -> list[dict]:
        """Return model_info of every model, sorted by name."""
        names = sorted(n.decode() for n in self.redis.smembers(keys.models()))
        infos = self.model_infos(names)
        return [i for i in infos if i is not None]

    def delete_model(self, name: str) -> bool:
        """Unload name; queued jobs on it may still finish until its weights expire."""
        version = self.redis.hget(keys.model(name), "version")
        with self.redis.pipeline() as pipe:
            pipe.delete(keys.model(name))
            pipe.srem(keys.models(), name)
            if version is not None:
                self._expire_version(pipe, name, int(version))
            pipe.execute()
        return version is not None

    def model_weights(self, name: str, version: int) -> bytes | None:
        """Return the safetensors bytes of one version, or None when it is gone."""
        return self.redis.get(keys.weights(name, version))

    # -- big values -----------------------------------------------------------------------------
    def _read_into(self, key: str, size: int | None = None) -> bytearray | None:
        """Return the whole value of a string key read in slices, or None when it is missing."""
        client = bulk_client(self.redis)
        if size is None:
            size = int(client.strlen(key))
            if size == 0:
                return None if not client.exists(key) else bytearray()
        out = bytearray(size)
        for start, piece in zip(
            range(0, size, SLICE_BYTES), self._slices(key, 0, size), strict=True
        ):
            if len(piece) != min(SLICE_BYTES, size - start):
                return None  # it expired or was deleted while we read it
            out[start : start + len(piece)] = piece
        return out

    def _slices(self, key: str, start: int, stop: int) -> Iterator[bytes]:
        client = bulk_client(self.redis)
        for offset in range(start, stop, SLICE_BYTES):
            yield cast(bytes, client.getrange(key, offset, min(offset + SLICE_BYTES, stop) - 1))

    # -- inputs ---------------------------------------------------------------------------------
    def put_input(self, job_id: str, images: np.ndarray, *, pipe=None) -> None:
        """Store a job's images (N, H, W, C) uint8 or float32 for input_ttl seconds.

        With pipe, its Redis write is added to that pipeline (the caller executes it); a file
        blob is written at once.
        """
        client = self.redis if pipe is None else pipe
        if self.blobs is None:
            client.set(self.input_key(job_id), to_npy(images), ex=self.input_ttl)
            return
        images = np.ascontiguousarray(images)
        name = f"input-{job_id}"
        self.blobs.write(name, [npy_header(images.shape, images.dtype), images.data.cast("B")])
        client.set(self.input_key(job_id), _FILE_REF + name.encode(), ex=self.input_ttl)

    def get_input(self, job_id: str) -> np.ndarray | None:
        """Return a job's images (writable), or None when they expired.

        BlobMissing if Redis names a file this process cannot see.
        """
        return self.read_input(job_id)[0]

    def read_input(self, job_id: str) -> tuple[np.ndarray | None, bool]:
        """Return (get_input(job_id), whether the images were a file in the blob directory).

        Where the API put a job's images is where its results go (put_result's files=): a
        worker with a blob directory serving an API without one must answer through Redis.
        """
        key = self.input_key(job_id)
        size = int(bulk_client(self.redis).strlen(key))
        if 0 < size <= 128:  # a file reference (a .npy is never this short)
            small = self.redis.get(key)
            if small is None:
                return None, False
            if small.startswith(_FILE_REF):
                return from_npy(self._map(small[len(_FILE_REF) :].decode(), writable=True)), True
            return from_npy(bytearray(small)), False  # already read whole
        raw = self._read_into(key, size or None)
        return (None if raw is None else from_npy(raw)), False

    def read_inputs(self, job_ids: list[str]) -> list[tuple[np.ndarray | None, bool] | Exception]:
        """read_input of each job id (a batch's), small ones in two round trips in all.

        An input that cannot be read gives its exception (BlobMissing, a Redis error) in its
        place, so one bad input fails only its job.
        """
        client = bulk_client(self.redis)
        with client.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.strlen(self.input_key(job_id))
            sizes = [int(n) for n in pipe.execute()]
        small = [i for i, n in enumerate(sizes) if 0 < n <= SLICE_BYTES]
        with self.redis.pipeline(transaction=False) as pipe:
            for i in small:
                pipe.get(self.input_key(job_ids[i]))
            values = dict(zip(small, pipe.execute(), strict=True))
        out: list[tuple[np.ndarray | None, bool] | Exception] = []
        for i, job_id in enumerate(job_ids):
            try:
                if i not in values:  # big (read in slices), or missing
                    out.append(self.read_input(job_id))
                    continue
                raw = values[i]
                if raw is None:
                    out.append((None, False))
                elif sizes[i] <= 128 and raw.startswith(_FILE_REF):
                    name = raw[len(_FILE_REF) :].decode()
                    out.append((from_npy(self._map(name, writable=True)), True))
                else:
                    out.append((from_npy(bytearray(raw)), False))
            except Exception as exc:  # noqa: BLE001 - this job's input, not its batch-mates'
                out.append(exc)
        return out

    # -- results --------------------------------------------------------------------------------
    def _data_key(self, job_id: str, index: int) -> str:
        return keys.result_data(job_id, index)

    def put_result(
        self, job_id: str, outputs: dict[str, np.ndarray], *, files: bool | None = None
    ) -> None:
        """Store every requested output, all or nothing, for result_ttl seconds.

        Each output's raw bytes go to their own key (or, with files, to a file in the blob
        directory; by default whenever there is one) straight from the array's memory; the
        result hash holds the names in order and each one's key or file, shape and dtype.
        """
        files = self.blobs is not None if files is None else files
        key = self.result_key(job_id)
        index: dict[str, dict[str, Any]] = {}
        arrays: dict[str, np.ndarray] = {}
        for i, (name, arr) in enumerate(outputs.items()):
            index[name] = {"key": i, "shape": list(arr.shape), "dtype": arr.dtype.str}
            if arr.dtype.kind == "O":  # byte strings, kept as V2 BYTES: 4-byte length, bytes
                index[name]["dtype"] = BYTES
                arrays[name] = np.frombuffer(bytes_tensor(arr), np.uint8)
                index[name]["size"] = arrays[name].size
            else:
                arrays[name] = np.ascontiguousarray(arr)
        if files:  # files first: the index below is what makes them visible
            blobs = self._blobs_for(f"result-{job_id}")
            written: list[str] = []
            try:
                for name, arr in arrays.items():
                    entry = index[name]
                    entry["file"] = f"result-{job_id}.{entry.pop('key')}"
                    blobs.write(entry["file"], [arr.data.cast("B")])
                    written.append(entry["file"])
            except BaseException:
                blobs.delete(*written)
                raise
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            for name, arr in arrays.items():
                if "key" in index[name]:
                    pipe.set(
                        self._data_key(job_id, index[name]["key"]),
                        arr.data.cast("B"),
                        ex=self.result_ttl,
                    )
            pipe.hset(
                key,
                mapping={
                    _NAMES_FIELD: json.dumps(list(arrays)).encode(),
                    _INDEX_FIELD: json.dumps(index).encode(),
                },
            )
            pipe.expire(key, self.result_ttl)
            pipe.execute()

    def _index(self, job_id: str) -> dict | None:
        raw = self.redis.hget(self.result_key(job_id), _INDEX_FIELD)
        return None if raw is None else json.loads(raw)

    def result_index(self, job_id: str) -> tuple[list[str], dict] | None:
        """Return (output names in request order, index) of a result in one round trip, or None.

        The index may be passed to result_layout, result_nbytes, result_slices and result_array
        so that reading one result costs one read of its index.
        """
        raw_names, raw_index = self.redis.hmget(self.result_key(job_id), _NAMES_FIELD, _INDEX_FIELD)
        if raw_names is None or raw_index is None:
            return None
        return json.loads(raw_names), json.loads(raw_index)

    def _entry(self, job_id: str, name: str, index: dict | None) -> dict | None:
        """Return one output's index entry: from index when given (result_index), else read."""
        if index is None:
            index = self._index(job_id) or {}
        return index.get(name)

    def result_names(self, job_id: str) -> list[str] | None:
        """Return the output names of a result in request order; None when there is none."""
        raw = self.redis.hget(self.result_key(job_id), _NAMES_FIELD)
        return None if raw is None else json.loads(raw)

    def result_layout(
        self, job_id: str, name: str, index: dict | None = None
    ) -> tuple[tuple[int, ...], np.dtype] | None:
        """Return (shape, dtype) of one output (dtype object: byte strings), or None."""
        entry = self._entry(job_id, name, index)
        return None if entry is None else (tuple(entry["shape"]), _dtype(entry))

    def result_nbytes(self, job_id: str, name: str, index: dict | None = None) -> int | None:
        """Return the bytes result_slices yields for one output, or None when there is none."""
        entry = self._entry(job_id, name, index)
        return None if entry is None else _size(entry)

    def result_slices(
        self, job_id: str, name: str, index: dict | None = None
    ) -> Iterator[bytes] | None:
        """Return an iterator over one output's raw bytes in slices, or None when it is gone.

        The iterator raises LookupError should the result vanish (TTL, delete) while it runs,
        rather than end short.
        """
        entry = self._entry(job_id, name, index)
        if entry is None:
            return None
        size = _size(entry)
        if "file" in entry:
            view = memoryview(self._map(entry["file"], writable=False))
            if len(view) != size:
                raise BlobMissing(
                    entry["file"], f"{entry['file']} holds {len(view)} bytes, not {size}"
                )
            # bytes, not views: WSGI servers (gunicorn) send nothing else; a copy from the page
            # cache costs ~0.4 ms per 9 MB here.
            return (bytes(view[o : o + FILE_SLICE_BYTES]) for o in range(0, size, FILE_SLICE_BYTES))
        key = self._data_key(job_id, entry["key"])
        client = bulk_client(self.redis)

        def read(offset: int) -> bytes:
            piece = cast(bytes, client.getrange(key, offset, min(offset + SLICE_BYTES, size) - 1))
            if len(piece) != min(SLICE_BYTES, size - offset):
                raise LookupError(f"the result of job {job_id} vanished while it was read")
            return piece

        def pieces() -> Iterator[bytes]:
            # Reading the next slice in a helper thread while this one is sent measured slower
            # (GIL and 2 cores shared with the client and Redis), so slices go one by one.
            for offset in range(0, size, SLICE_BYTES):
                yield read(offset)

        return pieces()

    def result_array(self, job_id: str, name: str, index: dict | None = None) -> np.ndarray | None:
        """Return one output as a (writable) array, or None."""
        entry = self._entry(job_id, name, index)
        if entry is None:
            return None
        size = _size(entry)
        if "file" in entry:
            raw = self._map(entry["file"], writable=True)
            if len(raw) != size:
                raise BlobMissing(
                    entry["file"], f"{entry['file']} holds {len(raw)} bytes, not {size}"
                )
        else:
            raw = self._read_into(self._data_key(job_id, entry["key"]), size)
            if raw is None:
                return None
        if entry["dtype"] == BYTES:
            return from_bytes_tensor(raw, entry["shape"])
        return np.frombuffer(raw, np.dtype(entry["dtype"])).reshape(entry["shape"])

    # -- cancellation and cleanup ---------------------------------------------------------------
    def mark_canceled(self, job_id: str) -> None:
        """Tell whoever runs job_id to stop at the next layer."""
        self.redis.set(self.cancel_key(job_id), b"1", ex=self.input_ttl)

    def is_canceled(self, job_id: str) -> bool:
        return bool(self.redis.exists(self.cancel_key(job_id)))

    def claim_run(self, job_id: str, token: str, ttl: float) -> None:
        """Record token as the one run of job_id allowed to go on (the latest attempt wins).

        ttl is in seconds, kept to whole seconds (at least one).
        """
        self.redis.set(keys.run(job_id), token, ex=max(1, int(ttl)))

    def run_state(self, job_id: str, token: str) -> tuple[bool, bool]:
        """Return (still this run's job, canceled) in one round trip."""
        run, canceled = self.redis.mget(keys.run(job_id), self.cancel_key(job_id))
        return run is None or run.decode() == token, canceled is not None

    def claim_runs(self, tokens: dict[str, str], ttl: int) -> None:
        """claim_run for every job id -> token of a batch, in one round trip."""
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id, token in tokens.items():
                pipe.set(keys.run(job_id), token, ex=max(1, int(ttl)))
            pipe.execute()

    def run_states(self, tokens: dict[str, str]) -> dict[str, tuple[bool, bool]]:
        """run_state of every job id -> token of a batch, in one round trip."""
        ids = list(tokens)
        found = self.redis.mget([keys.run(i) for i in ids] + [self.cancel_key(i) for i in ids])
        runs, marks = found[: len(ids)], found[len(ids) :]
        return {
            i: (run is None or run.decode() == tokens[i], mark is not None)
            for i, run, mark in zip(ids, runs, marks, strict=True)
        }

    def finish_run(self, job_id: str, input_id: str) -> None:
        """Drop what an ended job (finished or failed for good) no longer needs: its input, its
        run claim and its cancel mark."""
        self.redis.delete(self.input_key(input_id), keys.run(job_id), self.cancel_key(job_id))
        if self.blobs is not None:
            self.blobs.delete(f"input-{input_id}")

    def delete_job(self, job_id: str, *, pipe=None) -> list[str]:
        """Delete a job's input and result (the cancel mark stays until it expires).

        With pipe, the Redis deletes join that pipeline and the blob files are left to the
        caller, who passes the names returned to delete_blobs once the pipeline ran (a file goes
        only after the keys that name it).
        """
        entries = list((self._index(job_id) or {}).values())
        (self.redis if pipe is None else pipe).delete(
            self.input_key(job_id),
            self.result_key(job_id),
            keys.run(job_id),
            keys.ended(job_id),
            *(self._data_key(job_id, e["key"]) for e in entries if "key" in e),
        )
        files = [f"input-{job_id}", *(e["file"] for e in entries if "file" in e)]
        if pipe is None:
            self.delete_blobs(files)
        return files

    def delete_blobs(self, names: list[str]) -> None:
        """Delete blob files by name (delete_job's); nothing without a blob directory."""
        if self.blobs is not None:
            self.blobs.delete(*names)

    def sweep_blobs(self) -> int:
        """Delete blob files past their TTL (their Redis records are gone); return how many."""
        if self.blobs is None:
            return 0
        return self.blobs.sweep(self.input_ttl, self.result_ttl)
