"""`convq import-onnx MODEL.onnx -o DIR`: write DIR/spec.json and DIR/weights.safetensors."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import EngineError
from .onnx_import import convert
from .summary import format_summary
from .weights import to_safetensors

__all__ = ["convert", "main"]


def main(argv=None) -> int:
    """Convert an ONNX ConvNet to spec + weights and print its summary; 0 on success, 2 on error."""
    parser = argparse.ArgumentParser(
        prog="convq import-onnx", description="Convert an ONNX ConvNet to spec.json + weights."
    )
    parser.add_argument("model", help="the .onnx file")
    parser.add_argument("-o", "--output", required=True, help="directory to write into")
    parser.add_argument("--name", help="model name (default: the graph's name)")
    parser.add_argument(
        "--labels", help="a text file of class labels, one per line, one per output channel"
    )
    args = parser.parse_args(argv)
    try:
        with open(args.model, "rb") as f:
            data = f.read()
        labels = None
        if args.labels:
            with open(args.labels, encoding="utf-8") as f:
                labels = [line.strip() for line in f if line.strip()]
        spec, arrays = convert(data, name=args.name, labels=labels)
        from .model import Model  # check the result the way an upload is checked

        model = Model.from_arrays(spec, arrays)
        os.makedirs(args.output, exist_ok=True)
        spec_path = os.path.join(args.output, "spec.json")
        weights_path = os.path.join(args.output, "weights.safetensors")
        with open(spec_path, "w") as f:
            json.dump(model.spec, f, indent=1)
        with open(weights_path, "wb") as f:
            f.write(to_safetensors(model.arrays()))
    except (EngineError, OSError) as err:
        print(f"error: {getattr(err, 'message', None) or err}", file=sys.stderr)
        return 2
    print(format_summary(model.summary()))
    print(f"wrote {spec_path} and {weights_path}")
    return 0
