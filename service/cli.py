"""The `convq` command: up, api, worker, submit, summary, import-onnx, warmup, info, bench."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

USAGE = """convq <command> [options]

  up           API + workers in one process (embedded Redis unless REDIS_URL), demo model loaded
  api          the API alone (gunicorn), against REDIS_URL
  worker       one worker process
  submit       send images to a server, wait, save the activations
  summary      print a model's layer table:  convq summary SPEC [--height H --width W] [--batch N]
  import-onnx  convert an .onnx file:         convq import-onnx MODEL.onnx -o DIR
  warmup       compile (or load from cache) every engine kernel, measure the conv kernels once
  info         CPU, ISA, conv kernel choices:  convq info [--measure] [--json]
  bench        run the benchmarks:            convq bench [engine|service] [args]
"""


def _serve_args(prog: str, argv: list[str], workers: int) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"convq {prog}")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--workers",
        type=int,
        default=workers,
        help=f"{'worker threads' if prog == 'up' else 'API processes (CONVQ_API_WORKERS)'}"
        f" (default {workers})",
    )
    return p.parse_args(argv)


def load_demo(store) -> None:
    """Store the demo model as "demo" (server-owned, visible to every key)."""
    from engine import Model
    from service.demo import demo_model

    spec, arrays = demo_model()
    model = Model.from_arrays(spec, arrays)
    store.put_model("demo", model.spec, model.to_safetensors(), owner=None)


def _demo_files() -> list[Path]:
    from service.demo import demo_images

    folder = Path(tempfile.gettempdir()) / "convq-demo"
    folder.mkdir(exist_ok=True)
    paths = []
    for name, data in demo_images():
        path = folder / name
        path.write_bytes(data)
        paths.append(path)
    return paths


def how_to_submit(base: str) -> str:
    """Return the instructions `convq up` prints: curl and `convq submit` against base."""
    files = _demo_files()
    first = files[0]
    auth = ' -H "Authorization: Bearer $KEY"' if os.environ.get("CONVQ_API_KEYS") else ""
    return f"""
convq is up at {base}  (model "demo": AlexNet conv1 -> relu1 -> pool1, 227x227 RGB)
Sample pictures: {first.parent}

Submit an image with curl, then poll the job and fetch a layer as a picture:
  curl -s{auth} -F images=@{first} -F outputs=all {base}/v2/models/demo/jobs
  curl -s{auth} {base}/v2/jobs/<id>
  curl -s{auth} -o conv1.png "{base}/v2/jobs/<id>/result?output=conv1&format=png&image=0"
  curl -s{auth} -o pool1.npy "{base}/v2/jobs/<id>/result?output=pool1&format=npy"

Or with the client (progress bar, saves .npz and PNG grids):
  convq submit --url {base} --model demo {" ".join(str(f) for f in files)}

API document: {base}/openapi.json   Web page: {base}/   Ctrl+C stops.
"""


def up(argv: list[str]) -> int:
    """Run the API and embedded workers in this process; fakeredis unless REDIS_URL is set."""
    import logging

    from werkzeug.serving import make_server

    from service.app import create_app
    from service.auth import KeyListError, parse_keys
    from worker.contract.config import Settings
    from worker.embedded import start_workers

    from .servers import JsonErrorRequestHandler

    args = _serve_args("up", argv, workers=1)
    try:
        parse_keys(os.environ.get("CONVQ_API_KEYS", ""))
    except KeyListError as exc:
        print(f"convq: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level="INFO", format="%(asctime)s %(name)s %(message)s")
    settings = Settings.from_env()
    blobs = None
    if not settings.redis_url and not settings.blob_dir:
        # Everything is in this process: images and maps go through a private directory
        # rather than through the in-process Redis (see worker/blobs.py).
        blobs = tempfile.TemporaryDirectory(prefix="convq-blobs-")
        settings = dataclasses.replace(settings, blob_dir=blobs.name)
    config: dict = {"SETTINGS": settings}
    if not settings.redis_url:
        import fakeredis

        config["REDIS"] = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    app = create_app(config)
    ext = app.extensions["convq"]
    load_demo(ext.store)
    print(
        "warming up the engine (the first run on a machine compiles its kernels, ~30 s) ...",
        flush=True,
    )
    began = time.monotonic()
    handle = start_workers(ext.redis, settings, n=args.workers)
    print(f"engine ready in {time.monotonic() - began:.1f} s", flush=True)
    server = make_server(
        args.host, args.port, app, threaded=True, request_handler=JsonErrorRequestHandler
    )
    where = "embedded in-process Redis" if "REDIS" in config else settings.redis_url
    print(f"{args.workers} worker(s) over {where}", flush=True)
    print(how_to_submit(f"http://{args.host}:{server.server_port}"), flush=True)

    def stop(signum, frame):  # SIGTERM (docker stop, systemd, kill) ends it as Ctrl+C does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        handle.stop()
        if blobs is not None:
            blobs.cleanup()
    return 0


def api(argv: list[str]) -> int:
    """Serve service.wsgi:app with gunicorn, configured by service/gunicorn_conf.py."""
    from gunicorn.app.base import BaseApplication

    from service import gunicorn_conf  # exits 2 on an invalid CONVQ_API_KEYS

    args = _serve_args("api", argv, workers=gunicorn_conf.workers)
    names = (
        "worker_class",
        "worker_connections",
        "timeout",
        "graceful_timeout",
        "accesslog",
        "post_fork",
    )
    settings = {name: getattr(gunicorn_conf, name) for name in names}
    settings.update(bind=f"{args.host}:{args.port}", workers=args.workers)

    class Gunicorn(BaseApplication):
        def load_config(self):
            for key, value in settings.items():
                self.cfg.set(key, value)

        def load(self):
            from service.wsgi import app

            return app

    Gunicorn().run()
    return 0


def bench(argv: list[str]) -> int:
    """Run bench/<name>.py from the source checkout with the remaining arguments."""
    name = argv[0] if argv and not argv[0].startswith("-") else "engine"
    rest = argv[1:] if argv and not argv[0].startswith("-") else argv
    script = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    if not script.exists():
        print(f"convq bench: no {script} (benchmarks run from a source checkout)", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, str(script), *rest])


def warmup(argv: list[str]) -> int:
    import time

    import engine

    started = time.monotonic()
    engine.warmup()
    engine.backward.warmup()  # explain jobs' kernels
    print(f"kernels ready in {time.monotonic() - started:.1f} s")
    from engine import kernels

    threads = engine.ops._threads.max_threads()
    chosen = [(c, *kernels.ranking(c, threads)) for c in kernels.CLASSES]
    print(
        f"conv kernels ({chosen[0][2]}; convq info for more): "
        + ", ".join(f"{c} {names[0]}" for c, names, _ in chosen)
    )
    return 0


COMMANDS = {  # command -> "module:function(argv) -> exit status", imported only when used
    "up": "service.cli:up",
    "api": "service.cli:api",
    "worker": "worker.runner:main",
    "submit": "service.client:main",
    "summary": "engine.summary:main",
    "import-onnx": "engine.onnx_cli:main",
    "warmup": "service.cli:warmup",
    "info": "engine.tuning:main",
    "bench": "service.cli:bench",
}


def main(argv: list[str] | None = None) -> int:
    """Dispatch `convq <command> ...`; return the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"convq: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    module, name = COMMANDS[command].split(":")
    return getattr(importlib.import_module(module), name)(rest)


if __name__ == "__main__":
    sys.exit(main())
