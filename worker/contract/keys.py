"""Every Redis key convq writes, built in one place (rq's own keys start with "rq:").

Models:   convq:models (set of names), convq:model:<name> (hash: version, owner, ...),
          convq:model-version:<name> (counter), convq:spec:<name>:<v>, convq:weights:<name>:<v>
Jobs:     convq:input:<id>, convq:result:<id> (index hash), convq:result:<id>:<i> (one output),
          convq:cancel:<id>, convq:run:<id> (the attempt allowed to go on),
          convq:ended:<id> (a list a worker pushes to when the job ends: wakes a waiting /infer),
          convq:jobs:<owner> (sorted set of an owner's job ids, score = enqueue time)
Webhooks: convq:webhook:<id> (hash: a job's callback delivery), convq:webhooks:due (sorted set:
          job id -> when its next attempt is due), convq:webhook-lease:<id> (the dispatcher
          delivering it), convq:webhook-secret (generated server secret, when none is configured)
Workers:  convq:sweep-lock:<queue>, convq:expired-seen:<queue>
Metrics:  convq:telemetry:jobs, convq:telemetry:<kind>_seconds, convq:telemetry:callbacks
"""

from __future__ import annotations

PREFIX = "convq:"
"""Prefix of every key convq itself writes."""


def key(*parts: object, prefix: str = PREFIX) -> str:
    """Return prefix + the parts joined by ':' (key("result", "ab12", 0) -> convq:result:ab12:0)."""
    return prefix + ":".join(str(p) for p in parts)


def models() -> str:
    return key("models")


def model(name: str) -> str:
    return key("model", name)


def model_version(name: str) -> str:
    return key("model-version", name)


def spec(name: str, version: int) -> str:
    return key("spec", name, version)


def weights(name: str, version: int) -> str:
    return key("weights", name, version)


def job_input(job_id: str) -> str:
    return key("input", job_id)


def result(job_id: str) -> str:
    return key("result", job_id)


def result_data(job_id: str, index: int) -> str:
    return key("result", job_id, index)


def owner_jobs(owner: str | None) -> str:
    """The sorted set listing owner's jobs ("-" stands for no owner: auth off)."""
    return key("jobs", owner or "-")


def cancel(job_id: str) -> str:
    return key("cancel", job_id)


def run(job_id: str) -> str:
    return key("run", job_id)


def webhook(job_id: str) -> str:
    return key("webhook", job_id)


def webhooks_due() -> str:
    return key("webhooks", "due")


def webhook_lease(job_id: str) -> str:
    return key("webhook-lease", job_id)


def webhook_secret() -> str:
    return key("webhook-secret")


def ended(job_id: str) -> str:
    return key("ended", job_id)


def sweep_lock(queue: str) -> str:
    return key("sweep-lock", queue)


def expired_seen(queue: str) -> str:
    return key("expired-seen", queue)


def telemetry_jobs() -> str:
    return key("telemetry", "jobs")


def telemetry_seconds(kind: str) -> str:
    return key("telemetry", f"{kind}_seconds")


def telemetry_callbacks() -> str:
    return key("telemetry", "callbacks")
