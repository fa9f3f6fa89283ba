"""`convq submit`: upload a model if asked, run images as one job, save the activations.

    convq submit --url URL [--model NAME] [--spec spec.json --weights w.npz | --onnx m.onnx]
                 [--outputs all|a,b] [--top K] [--out DIR] [--api-key KEY]
                 [--explain METHOD [--layer L] [--channel K|top] [--at CONV]]
                 [--dtype float16|uint8] [--channels A:B|I,J] [--crop T,L,H,W] [--stats|--png]
                 IMAGES_OR_FOLDERS...

Saves DIR/<job>.npz (one float32 (N, Hout, Wout, K) array per requested layer) and
DIR/<job>/<layer>/<i>-<image>.png (that layer's maps as a grid, one picture per image).
With --top K, prints each image's K highest scores of the last layer as "score:index:label"
(labels from the model's spec, else the index), as the V2 classification extension does.
With --explain saliency|gradcam|gradient [--layer fc] [--channel K|top] the job also explains
that channel over the pixels: DIR/<job>/explain:overlay/<i>-<image>.png are heatmaps over the
images, and the .npz holds explain:map and explain:channel.
Lean results (every output, applied in the worker): --dtype float16 or uint8 (the .npz then
holds <layer>:scale and <layer>:offset, x = scale * q + offset per image and channel),
--channels, --crop, --stats (an (N, K, 5) array per layer: min, max, mean, std, zero fraction;
no grids), --png (the grids only; no .npz arrays for those layers).
Exit status: 0 done, 1 the server or the job refused, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import requests
from tqdm import tqdm

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".npy")
DONE = ("finished", "failed", "canceled")


class ClientError(Exception):
    """What went wrong, worded for the terminal."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="convq submit", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "images",
        nargs="+",
        metavar="IMAGES_OR_FOLDERS",
        help="PNG/JPEG/.npy files, or folders of them (same size within one job)",
    )
    p.add_argument(
        "--url",
        default=os.environ.get("CONVQ_URL", "http://127.0.0.1:8000"),
        help="the convq server (default $CONVQ_URL or http://127.0.0.1:8000)",
    )
    p.add_argument(
        "--model", help="model name (default: the spec's name, the .onnx file's stem, or 'demo')"
    )
    p.add_argument("--spec", type=Path, help="spec.json to upload (with --weights)")
    p.add_argument("--weights", type=Path, help=".npz or .safetensors weights to upload")
    p.add_argument("--onnx", type=Path, help="an .onnx model to upload instead of spec+weights")
    p.add_argument("--outputs", default="all", help="'all' or comma-separated layer names")
    p.add_argument(
        "--top",
        type=int,
        metavar="K",
        help="print each image's top K classes of the last layer (score:index:label)",
    )
    p.add_argument("--out", type=Path, default=Path("convq-out"), help="where to save results")
    p.add_argument(
        "--api-key",
        default=os.environ.get("CONVQ_API_KEY"),
        help="bearer key (default $CONVQ_API_KEY)",
    )
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the job")
    p.add_argument(
        "--callback",
        metavar="URL",
        help="also have the server POST a signed notice to URL when the job ends",
    )
    p.add_argument("--no-png", action="store_true", help="save the .npz only")
    p.add_argument(
        "--explain",
        choices=("saliency", "gradcam", "gradient"),
        help="also explain a channel of --layer over the pixels; saves heatmap overlays",
    )
    p.add_argument("--layer", help="the layer to explain (default: the last)")
    p.add_argument(
        "--channel", default="top", help="channel to explain, or 'top' (each image's highest)"
    )
    p.add_argument("--at", help="gradcam: the conv layer (default: the last before --layer)")
    lean = p.add_argument_group("lean results (applied to every output, in the worker)")
    lean.add_argument(
        "--dtype",
        choices=("float32", "float16", "uint8"),
        help="store the maps in this type (uint8: with per-channel scale and offset)",
    )
    lean.add_argument(
        "--channels", metavar="A:B|I,J,...", help="keep these channels: a range or a list"
    )
    lean.add_argument("--crop", metavar="TOP,LEFT,HEIGHT,WIDTH", help="keep this part of each map")
    lean.add_argument(
        "--stats",
        action="store_true",
        help="per-channel min, max, mean, std, fraction of zeros instead of the maps",
    )
    lean.add_argument("--png", action="store_true", help="the PNG grids only, no arrays")
    args = p.parse_args(argv)
    if args.stats and args.png:
        p.error("--stats and --png exclude each other")
    if (args.stats or args.png) and args.dtype not in (None, "float32"):
        p.error("--dtype applies to maps; --stats and --png replace them")
    if args.png and args.no_png:
        p.error("--png asks for the pictures only; --no-png for none")
    if args.top and (args.png or args.stats or args.dtype == "uint8"):
        p.error("--top ranks the last layer's values: not with --png, --stats or --dtype uint8")
    try:
        args.lean = lean_request(args)
    except ValueError as exc:
        p.error(str(exc))
    if args.channel != "top" and not args.channel.isdigit():
        p.error("--channel is a channel number or 'top'")
    if (args.spec is None) != (args.weights is None):
        p.error("--spec and --weights go together")
    if args.onnx is not None and args.spec is not None:
        p.error("give --onnx or --spec/--weights, not both")
    if args.top is not None and args.top < 1:
        p.error("--top must be a positive integer")
    return args


def find_images(paths: list[str]) -> list[Path]:
    """Expand folders (recursively, sorted) into image files; keep files as given."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found += sorted(
                f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
            )
        elif path.is_file():
            found.append(path)
        else:
            raise ClientError(f"{raw}: no such file or folder")
    if not found:
        raise ClientError("no images found (looked for " + ", ".join(IMAGE_SUFFIXES) + ")")
    return found


class Api:
    """The few convq routes the client needs, over one requests.Session."""

    def __init__(self, url: str, key: str | None):
        self.url = url.rstrip("/")
        self.session = requests.Session()
        if key:
            self.session.headers["Authorization"] = f"Bearer {key}"

    def call(self, method: str, path: str, **kw) -> requests.Response:
        try:
            resp = self.session.request(
                method, self.url + path, timeout=kw.pop("timeout", 60), **kw
            )
        except requests.RequestException as exc:
            raise ClientError(f"cannot reach {self.url}: {exc}") from None
        if resp.status_code >= 400:
            try:
                message = resp.json()["error"]
            except (ValueError, KeyError, TypeError):
                message = resp.text[:200] or resp.reason
            raise ClientError(f"{method} {path}: {resp.status_code} {message}")
        return resp


def upload(api: Api, name: str, args: argparse.Namespace) -> str:
    """Upload the model given on the command line; return its version."""
    if args.onnx is not None:
        files = {"weights": (args.onnx.name, args.onnx.read_bytes())}
    else:
        files = {
            "spec": ("spec.json", args.spec.read_bytes()),
            "weights": (args.weights.name, args.weights.read_bytes()),
        }
    answer = api.call("POST", f"/v2/repository/models/{name}/load", files=files).json()
    return str(answer.get("version", "?"))


def model_name(args: argparse.Namespace) -> str:
    if args.model:
        return args.model
    if args.spec is not None:
        try:
            name = json.loads(args.spec.read_text()).get("name")
        except (OSError, ValueError, AttributeError) as exc:
            raise ClientError(f"{args.spec}: not a readable spec ({exc})") from None
        if name:
            return str(name)
    if args.onnx is not None:
        return args.onnx.stem
    return "demo"


def lean_request(args: argparse.Namespace) -> dict | None:
    """Return the job's lean field {"*": options} from --dtype, --channels, --crop, --stats, --png.

    ValueError when --channels or --crop cannot be read.
    """
    options: dict = {}
    if args.dtype:
        options["dtype"] = args.dtype
    if args.channels:
        if ":" in args.channels:
            options["channels"] = args.channels
        else:
            try:
                options["channels"] = [int(c) for c in args.channels.split(",")]
            except ValueError:
                raise ValueError('--channels is a range "a:b" or a list "i,j,..."') from None
    if args.crop:
        try:
            options["crop"] = [int(v) for v in args.crop.split(",")]
        except ValueError:
            raise ValueError("--crop is TOP,LEFT,HEIGHT,WIDTH (integers)") from None
        if len(options["crop"]) != 4:
            raise ValueError("--crop is TOP,LEFT,HEIGHT,WIDTH (four integers)")
    for flag in ("stats", "png"):
        if getattr(args, flag):
            options[flag] = True
    return {"*": options} if options else None


def explain_request(args: argparse.Namespace) -> dict | None:
    """Return the job's explain object from --explain, --layer, --channel and --at."""
    if args.explain is None:
        return None
    req: dict = {"method": args.explain, "channel": "top"}
    if args.channel != "top":
        req["channel"] = int(args.channel)
    for key in ("layer", "at"):
        if getattr(args, key):
            req[key] = getattr(args, key)
    return req


def submit(
    api: Api,
    model: str,
    images: list[Path],
    outputs: str,
    explain: dict | None = None,
    lean: dict | None = None,
    callback: str | None = None,
) -> str:
    """POST the images as one multipart job; return the job id."""
    files = [("images", (p.name, p.read_bytes())) for p in images]
    data = {"outputs": outputs}
    if explain is not None:
        data["explain"] = json.dumps(explain)
    if lean is not None:
        data["lean"] = json.dumps(lean)
    if callback is not None:
        data["callback"] = callback
    resp = api.call("POST", f"/v2/models/{model}/jobs", files=files, data=data)
    return resp.json()["id"]


def model_info(api: Api, model: str) -> tuple[list[str], list[str] | None]:
    """Return (layer names in order, class labels or None) from the model's V2 metadata."""
    meta = api.call("GET", f"/v2/models/{model}").json()
    return [o["name"] for o in meta.get("outputs") or []], meta.get("labels")


def print_top(path: Path, last: str, images: list[Path], k: int, labels) -> None:
    """Print each image's top k of layer last (from the saved .npz) to stdout."""
    from .classify import top_k

    with np.load(path, allow_pickle=False) as saved:
        rows = top_k(saved[last], k, labels)
    for image, row in zip(images, rows, strict=True):
        print(f"{image.name}: {', '.join(row)}")


def wait(api: Api, job: str, timeout: float, layers: int = 1, out=None) -> dict:
    """Poll the job, feeding a progress bar with its per-layer progress; return the last status."""
    deadline = time.monotonic() + timeout
    delay = 0.1
    with tqdm(
        total=layers, unit="layer", desc=f"job {job[:8]} queued", file=out or sys.stderr, leave=True
    ) as bar:
        while True:
            status = api.call("GET", f"/v2/jobs/{job}").json()
            progress = status.get("progress") or {}
            if progress.get("of"):
                # "layer" is 1-based and written as that layer starts: the ones before it are done
                bar.total = progress["of"]
                bar.n = max(0, progress["layer"] - 1)
                bar.set_description(f"job {job[:8]} {progress.get('name', '')}", refresh=False)
            if status["status"] in DONE:
                if status["status"] == "finished":
                    bar.n = bar.total
                bar.set_description(f"job {job[:8]} {status['status']}", refresh=False)
                return status  # closing the bar draws it once more, final
            bar.refresh()
            if time.monotonic() > deadline:
                raise ClientError(
                    f"job {job} still {status['status']} after {timeout:g} s "
                    f"(it keeps running; GET /v2/jobs/{job})"
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)


_SAFE_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:\-]{0,127}")


def safe_part(value: object, what: str) -> str:
    """Return value if it can name one file inside a folder; ClientError otherwise.

    Job ids and output names come from the server: a name with a separator, "..", a leading
    dot or anything outside the layer-name alphabet could write outside the output folder.
    """
    if not isinstance(value, str) or not _SAFE_PART.fullmatch(value) or ".." in value:
        raise ClientError(f"the server sent an unsafe {what} {value!r}; nothing was saved")
    return value


def _inside(out: Path, path: Path) -> Path:
    if not path.resolve().is_relative_to(out.resolve()):
        raise ClientError(f"{path} leaves {out}; nothing more is saved")
    return path


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    # Not np.savez(path, **arrays): an output named "file" or "allow_pickle" would be taken
    # as one of its arguments.
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, array in arrays.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)


def save(
    api: Api,
    job: str,
    names: list[str],
    images: list[Path],
    out: Path,
    png: bool,
    lean: dict | None = None,
) -> list[Path]:
    """Fetch each output as .npy into out/<job>.npz and, unless png is False, PNG grids.

    lean is the job's lean options: a png output has grids only, a stats output no grid.
    """
    job = safe_part(job, "job id")
    names = [safe_part(name, "output name") for name in names]
    out.mkdir(parents=True, exist_ok=True)
    arrays = {}
    written = []
    for name in names:
        options = (lean or {}).get(name) or {}
        if not options.get("png"):
            raw = api.call(
                "GET", f"/v2/jobs/{job}/result", params={"output": name, "format": "npy"}
            ).content
            arrays[name] = np.load(io.BytesIO(raw), allow_pickle=False)
        if not png or options.get("stats") or (name in arrays and arrays[name].ndim < 3):
            continue  # explain:channel is one number per image, a uint8 scale one per channel
        folder = _inside(out, out / job / name)
        folder.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            grid = api.call(
                "GET",
                f"/v2/jobs/{job}/result",
                params={"output": name, "format": "png", "image": i},
            ).content
            path = _inside(out, folder / f"{i:03d}-{image.stem}.png")
            path.write_bytes(grid)
            written.append(path)
    npz = _inside(out, out / f"{job}.npz")
    _write_npz(npz, arrays)
    return [npz, *written]


def run(args: argparse.Namespace) -> int:
    images = find_images(args.images)
    api = Api(args.url, args.api_key)
    name = model_name(args)
    if args.spec is not None or args.onnx is not None:
        print(f"uploaded {name} version {upload(api, name, args)}", file=sys.stderr)
    layers, labels = model_info(api, name)
    outputs = args.outputs
    if args.top and layers and outputs != "all" and layers[-1] not in outputs.split(","):
        outputs += "," + layers[-1]  # --top ranks the last layer: fetch it too
    job = submit(api, name, images, outputs, explain_request(args), args.lean, args.callback)
    print(f"job {job}: {len(images)} image(s) on {name}", file=sys.stderr)
    status = wait(api, job, args.timeout, max(1, len(layers)))
    if status["status"] != "finished":
        print(
            f"job {job} {status['status']}: {status.get('error') or 'no reason given'}",
            file=sys.stderr,
        )
        return 1
    names = status.get("outputs") or []
    saved = save(api, job, names, images, args.out, png=not args.no_png, lean=status.get("lean"))
    print(f"saved {saved[0]} ({', '.join(names)})", file=sys.stderr)
    if len(saved) > 1:
        print(f"saved {len(saved) - 1} PNG grid(s) under {args.out / job}", file=sys.stderr)
    if args.top and layers:
        print_top(saved[0], layers[-1], images, args.top, labels)
    print(saved[0])  # stdout: the one path a script wants
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run `convq submit` with argv (without the 'submit' word); return the exit status."""
    try:
        args = parse_args(argv)
    except SystemExit as exc:  # argparse's --help and usage errors; callers want a status
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return run(args)
    except ClientError as exc:
        print(f"convq submit: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"convq submit: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
