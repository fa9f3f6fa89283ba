# convq: one image for the API (gunicorn) and the workers (`convq worker`).
#   docker build -t convq .            (docker compose builds it for you)
FROM python:3.11-slim

# libgomp1: Numba's OpenMP threading layer. Nothing else is compiled at install time.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/*

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # Compiled kernels land here at build time, so a fresh worker loads them in ~0.3 s instead
    # of compiling for ~4 s. The directory must stay readable by the runtime user.
    NUMBA_CACHE_DIR=/var/cache/convq/numba \
    # Numba's and OpenBLAS's thread pools must not spin against each other.
    OMP_WAIT_POLICY=PASSIVE \
    # prometheus-client's shared files for gunicorn's workers; compose mounts a tmpfs here.
    PROMETHEUS_MULTIPROC_DIR=/run/convq-metrics

RUN useradd --create-home --uid 10001 --user-group convq \
 && mkdir -p "$NUMBA_CACHE_DIR" "$PROMETHEUS_MULTIPROC_DIR" /var/lib/convq/blobs \
 && chown convq:convq "$NUMBA_CACHE_DIR" "$PROMETHEUS_MULTIPROC_DIR" /var/lib/convq/blobs

WORKDIR /opt/convq
COPY pyproject.toml README.md ./
COPY engine ./engine
COPY worker ./worker
COPY service ./service
RUN pip install . && rm -rf build *.egg-info

USER convq
# Fill Numba's cache as the user that will read it.
RUN convq warmup

EXPOSE 8000
# Workers, worker class and timeout: service/gunicorn_conf.py (CONVQ_API_WORKERS, CONVQ_API_TIMEOUT).
CMD ["gunicorn", "-c", "python:service.gunicorn_conf", "--bind", "0.0.0.0:8000", "service.wsgi:app"]
