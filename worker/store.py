"""Blobs in Redis under "convq:" keys: models, job inputs and job results.

Every array is stored as .npy bytes written and read with allow_pickle=False; weights are
safetensors bytes. Inputs and results carry TTLs; a model lives until it is unloaded, and a
replaced version's weights linger only long enough for jobs already queued on it.
"""

from __future__ import annotations

import io
import json
import time

import numpy as np

from . import defaults

_NAMES_FIELD = b"__names__"


def to_npy(array: np.ndarray) -> bytes:
    """Return array as .npy bytes (never pickled)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def from_npy(data: bytes) -> np.ndarray:
    """Read .npy bytes; object arrays are refused (allow_pickle=False)."""
    return np.load(io.BytesIO(data), allow_pickle=False)


class Store:
    """Models, inputs and results of convq jobs, as Redis keys under one prefix."""

    def __init__(self, redis, *, result_ttl: int = defaults.RESULT_TTL,
                 input_ttl: int = defaults.INPUT_TTL, prefix: str = defaults.KEY_PREFIX,
                 old_version_ttl: int | None = None):
        self.redis = redis
        self.result_ttl = result_ttl
        self.input_ttl = input_ttl
        self.prefix = prefix
        # A replaced version must outlive the jobs already queued on it.
        self.old_version_ttl = old_version_ttl or input_ttl

    # -- keys -----------------------------------------------------------------------------------
    def _key(self, *parts: object) -> str:
        return self.prefix + ":".join(str(p) for p in parts)

    def input_key(self, job_id: str) -> str:
        return self._key("input", job_id)

    def result_key(self, job_id: str) -> str:
        return self._key("result", job_id)

    def cancel_key(self, job_id: str) -> str:
        return self._key("cancel", job_id)

    # -- models ---------------------------------------------------------------------------------
    def put_model(self, name: str, spec: dict, weights: bytes, *, owner: str | None) -> int:
        """Store spec + safetensors weights as the next version of name; return that version."""
        # The counter outlives delete_model, so a name+version never means two different models.
        version = int(self.redis.incr(self._key("model-version", name)))
        previous = self.redis.hget(self._key("model", name), "version")
        info = {"name": name, "version": version, "owner": owner or "",
                "weights_bytes": len(weights), "created": time.time()}
        with self.redis.pipeline() as pipe:
            pipe.set(self._key("weights", name, version), weights)
            pipe.set(self._key("spec", name, version), json.dumps(spec))
            pipe.hset(self._key("model", name), mapping={k: json.dumps(v) for k, v in info.items()})
            pipe.sadd(self._key("models"), name)
            if previous is not None:
                self._expire_version(pipe, name, int(previous))
            pipe.execute()
        return version

    def _expire_version(self, pipe, name: str, version: int) -> None:
        pipe.expire(self._key("weights", name, version), self.old_version_ttl)
        pipe.expire(self._key("spec", name, version), self.old_version_ttl)

    def model_info(self, name: str) -> dict | None:
        """Return {name, version, spec, owner, weights_bytes, created} of the live version."""
        raw = self.redis.hgetall(self._key("model", name))
        if not raw:
            return None
        info = {k.decode(): json.loads(v) for k, v in raw.items()}
        info["owner"] = info.get("owner") or None
        spec = self.model_spec(name, info["version"])
        if spec is None:
            return None
        info["spec"] = spec
        return info

    def model_spec(self, name: str, version: int) -> dict | None:
        """Return the spec of one version, or None when it is gone."""
        raw = self.redis.get(self._key("spec", name, version))
        return None if raw is None else json.loads(raw)

    def list_models(self) -> list[dict]:
        """Return model_info of every model, sorted by name."""
        names = sorted(n.decode() for n in self.redis.smembers(self._key("models")))
        infos = [self.model_info(n) for n in names]
        return [i for i in infos if i is not None]

    def delete_model(self, name: str) -> bool:
        """Unload name; queued jobs on it may still finish until its weights expire."""
        version = self.redis.hget(self._key("model", name), "version")
        with self.redis.pipeline() as pipe:
            pipe.delete(self._key("model", name))
            pipe.srem(self._key("models"), name)
            if version is not None:
                self._expire_version(pipe, name, int(version))
            pipe.execute()
        return version is not None

    def model_weights(self, name: str, version: int) -> bytes | None:
        """Return the safetensors bytes of one version, or None when it is gone."""
        return self.redis.get(self._key("weights", name, version))

    # -- inputs ---------------------------------------------------------------------------------
    def put_input(self, job_id: str, images: np.ndarray) -> None:
        """Store a job's images (N, H, W, C) uint8 or float32 for input_ttl seconds."""
        self.redis.set(self.input_key(job_id), to_npy(images), ex=self.input_ttl)

    def get_input(self, job_id: str) -> np.ndarray | None:
        """Return a job's images, or None when they expired."""
        raw = self.redis.get(self.input_key(job_id))
        return None if raw is None else from_npy(raw)

    # -- results --------------------------------------------------------------------------------
    def put_result(self, job_id: str, outputs: dict[str, np.ndarray]) -> None:
        """Store every requested output, all or nothing, for result_ttl seconds."""
        key = self.result_key(job_id)
        mapping: dict = {name.encode(): to_npy(arr) for name, arr in outputs.items()}
        mapping[_NAMES_FIELD] = json.dumps(list(outputs)).encode()
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            pipe.hset(key, mapping=mapping)
            pipe.expire(key, self.result_ttl)
            pipe.execute()

    def result_names(self, job_id: str) -> list[str] | None:
        """Return the output names of a result in request order; None when there is none."""
        raw = self.redis.hget(self.result_key(job_id), _NAMES_FIELD)
        return None if raw is None else json.loads(raw)

    def result_npy(self, job_id: str, name: str) -> bytes | None:
        """Return the raw .npy bytes of one output, or None."""
        if name == _NAMES_FIELD.decode():
            return None
        return self.redis.hget(self.result_key(job_id), name)

    def result_array(self, job_id: str, name: str) -> np.ndarray | None:
        """Return one output as an array, or None."""
        raw = self.result_npy(job_id, name)
        return None if raw is None else from_npy(raw)

    # -- cancellation and cleanup ---------------------------------------------------------------
    def mark_canceled(self, job_id: str) -> None:
        """Tell whoever runs job_id to stop at the next layer."""
        self.redis.set(self.cancel_key(job_id), b"1", ex=self.input_ttl)

    def is_canceled(self, job_id: str) -> bool:
        return bool(self.redis.exists(self.cancel_key(job_id)))

    def claim_run(self, job_id: str, token: str, ttl: int) -> None:
        """Record token as the one run of job_id allowed to go on (the latest attempt wins)."""
        self.redis.set(self._key("run", job_id), token, ex=max(1, int(ttl)))

    def run_state(self, job_id: str, token: str) -> tuple[bool, bool]:
        """Return (still this run's job, canceled) in one round trip."""
        run, canceled = self.redis.mget(self._key("run", job_id), self.cancel_key(job_id))
        return run is None or run.decode() == token, canceled is not None

    def finish_run(self, job_id: str, input_id: str) -> None:
        """Drop what a finished job no longer needs: its input and its run claim."""
        self.redis.delete(self.input_key(input_id), self._key("run", job_id))

    def delete_job(self, job_id: str) -> None:
        """Delete a job's input and result (the cancel mark stays until it expires)."""
        self.redis.delete(self.input_key(job_id), self.result_key(job_id),
                          self._key("run", job_id))
