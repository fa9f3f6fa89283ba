"""The service's default settings; each can be overridden by a CONVQ_<NAME> environment variable."""

from worker.contract import defaults as _contract

MAX_CONTENT_LENGTH = 64 * 1024 * 1024
"""Bytes of one request body (inference and job submissions)."""

MAX_JSON_INPUT_BYTES = 16 * 1024 * 1024
"""Bytes of an inference request whose tensors are JSON numbers (each becomes a Python object
while parsing, ~10x the memory); bigger inputs use the binary tensor extension."""

MAX_MODEL_BYTES = 512 * 1024 * 1024
"""Bytes of one model upload request (spec plus weights, base64 included)."""

MAX_IMAGES = 256
"""Images in one job."""

MAX_PIXELS = 4096 * 4096
"""Pixels (height x width) of one image; guards against decompression bombs."""

MAX_OUTPUT_BYTES = 1024 * 1024 * 1024
"""Float32 bytes a job's requested outputs may take, predicted before enqueueing."""

MAX_RUN_BYTES = 2 * 1024 * 1024 * 1024
"""Bytes a job's run may hold at once (input, live layer outputs, requested outputs, scratch),
predicted before enqueueing from the model and the batch's shape (engine.footprint)."""

MAX_KEY_STORED_BYTES = 8 * 1024 * 1024 * 1024
"""Bytes of job images and predicted outputs one API key (or, with auth off, all clients) may
have stored at once, until the jobs are deleted or their results expire; past it 429."""

MAX_KEY_JOBS = 500
"""Jobs one API key (or, with auth off, all clients) may have queued or running at once; past it
429 + Retry-After."""

MAX_JSON_OUTPUT_BYTES = 16 * 1024 * 1024
"""Float32 bytes of outputs sent as JSON number lists (about 10x bigger as text); above it the
client must take the binary tensor extension or .npy."""

MAX_PNG_PIXELS = 32 * 1024 * 1024
"""Values (H x W x K) of one image's maps drawn as a PNG grid."""

MAX_FILTERS_DRAWN = 1024
"""Filters of one layer drawn by the page's filters.png (the first ones; the response's
X-Convq-Filters header says "drawn of total")."""

MAX_QUEUE = 1000
"""Jobs waiting in the queue before submissions get 503 + Retry-After."""

INFER_TIMEOUT = 120.0
"""Seconds POST .../infer waits for its job before answering 504."""

RETRY_AFTER = 5
"""Seconds a client is told to wait (Retry-After) when Redis is down or the queue is full."""

API_KEYS = ""
"""Comma-separated bearer keys; empty means no auth."""

ALLOWED_HOSTS = "localhost,127.0.0.1,[::1]"
"""With auth off: comma-separated Host names the API answers ('*' for any); see guard.py."""

SOCKET_TIMEOUT = 0.5
"""Seconds one Redis socket wait may take. A paused Redis can cost up to four waits (command,
reconnect handshake, retried command), so the API answers 503 within about 2 s."""

MODEL_CACHE_BYTES = _contract.MODEL_CACHE_BYTES
"""Weight bytes of validated models the API keeps in memory for shape checks (the most recent
model is kept whatever its size); one default with the workers' cache of the same name."""

API_WORKERS = 2
"""gunicorn processes of `convq api`, the Dockerfile and compose (CONVQ_API_WORKERS)."""

API_TIMEOUT = 180
"""Seconds gunicorn lets one request run (CONVQ_API_TIMEOUT); above INFER_TIMEOUT, so a waiting
/infer answers 504 itself instead of being cut off."""
