"""Every worker default in one place, each a named constant with its unit."""

QUEUE_NAME = "convq"
"""Name of the RQ queue the service enqueues on and the workers listen to."""

JOB_TIMEOUT = 600
"""Seconds a job may run before it fails with a timeout error."""

RESULT_TTL = 3600
"""Seconds results (and the job record) are kept after a job ends."""

INPUT_TTL = 86400
"""Seconds an uploaded input is kept; long enough to wait in a deep queue."""

MODEL_CACHE_BYTES = 512 * 1024 * 1024
"""Bytes of model weights a worker keeps in memory (LRU over name+version)."""

RETRIES = 3
"""Times a job is re-run after its worker died under it (never for a bad job)."""

HEARTBEAT_SECONDS = 5
"""Seconds between a busy worker's heartbeats (rq's job_monitoring_interval)."""

HEARTBEAT_GRACE = 20
"""Seconds a started job may go without a heartbeat before it counts as abandoned."""

MAINTENANCE_SECONDS = 5
"""Seconds between a worker's sweeps for abandoned jobs and stale registry entries."""

POLL_SECONDS = 2.0
"""Seconds an idle worker blocks on the queue before it looks at stop requests again
(CONVQ_POLL_SECONDS; each wake-up is one heartbeat and one BLPOP on Redis)."""

WORKER_TTL = 60
"""Seconds an idle worker's registration lives without a heartbeat."""

BATCH_MAX_IMAGES = 32
"""Most images a worker runs as one engine batch of queued jobs (0 or 1: no batching)."""

BATCH_WAIT_MS = 2
"""Milliseconds a worker holding a job waits for more queued jobs to fill its batch."""

BATCH_MAX_BYTES = 512 * 1024 * 1024
"""Bytes of activations (Model.memory) one batched run may hold, unless one job alone needs more."""

BATCH_SCAN = 128
"""Queued job ids a worker looks at, from the front of the queue, for jobs to batch."""

TIMEOUT_GRACE = 10
"""Seconds past a job's timeout before the worker kills a horse stuck inside a kernel."""

SOCKET_TIMEOUT = 2.0
"""Seconds a Redis command may take before the client gives up (connect and read)."""

BACKOFF_MAX = 30.0
"""Longest pause in seconds between reconnection attempts while Redis is down."""

CALLBACK_ATTEMPTS = 8
"""Times a job's callback is tried before its delivery is given up (state "failed")."""

CALLBACK_BACKOFF = 2.0
"""Seconds before the second attempt of a callback; each later pause doubles (with jitter)."""

CALLBACK_BACKOFF_MAX = 600.0
"""Longest pause in seconds between two attempts of a callback."""

CALLBACK_TIMEOUT = 10.0
"""Seconds one callback request may take to connect, and again to answer (twice it in all)."""

CALLBACK_THREADS = 4
"""Threads of a worker's dispatcher sending callbacks at once (a hung receiver holds one)."""

CALLBACK_POLL = 0.25
"""Seconds between a dispatcher's looks for callbacks that are due."""

WEBHOOK_KEEP = 86400
"""Seconds a job's callback delivery record is kept (it outlives the job's own record)."""
