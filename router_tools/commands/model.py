"""``hybrid-router model import|quantize``: bring your own ONNX classifier (see router_tools.model_import)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    imp = sub.add_parser("import", help="write a manifest for an ONNX classifier and validate it",
                         description="Read the graph's input and output, write DIR/model.json with the model's sha256, "
                                     "copy the model and labels, run it once; says what it could not infer.")
    imp.add_argument("model", metavar="MODEL.onnx")
    imp.add_argument("--labels", required=True, metavar="FILE", help="one label per line, or a JSON list")
    imp.add_argument("--out", required=True, metavar="DIR")
    imp.add_argument("--layout", choices=["NCHW", "NHWC"])
    imp.add_argument("--color", choices=["L", "RGB", "BGR"])
    imp.add_argument("--mean", help="one value or one per channel, comma-separated (of pixel*scale)")
    imp.add_argument("--std", help="one value or one per channel, comma-separated")
    imp.add_argument("--scale", type=float, help="pixel multiplier before mean/std (default 1/255)")
    imp.add_argument("--resize", choices=["letterbox", "stretch", "shorter_side_center_crop"])
    imp.add_argument("--interpolation", choices=["nearest", "bilinear", "bicubic", "lanczos", "box"])
    imp.add_argument("--output-kind", choices=["logits", "probabilities", "log_probabilities"])
    imp.add_argument("--output", metavar="NAME", help="the graph output to use (default: the first)")
    imp.add_argument("--size", metavar="HxW", help="input size when the graph leaves it dynamic")
    imp.add_argument("--codec", choices=["image", "tensor"], help="tensor: the app passes arrays (text, tabular)")
    imp.add_argument("--invert", choices=["never", "auto", "always"], help="invert bright-background images (default never)")
    imp.add_argument("--name", help="model name (default: the file's stem)")
    imp.add_argument("--version", default="1")

    q = sub.add_parser("quantize", help="static INT8 quantization calibrated on your images, with its costs measured",
                       description="onnxruntime static INT8 (QOperator, per-channel, reduce_range) calibrated on IMAGES "
                                   "through the manifest's preprocessing; reports sizes, accuracy (DIR/<label>/ layout) "
                                   "and batch-1 latency of INT8 vs FP32 measured side by side here.")
    q.add_argument("dir", metavar="DIR", help="a folder written by 'model import'")
    q.add_argument("--calibration-data", required=True, metavar="IMAGES", help="a folder of images, or DIR/<label>/*")
    q.add_argument("--out", required=True, metavar="DIR2")
    q.add_argument("--eval-data", metavar="LABELED", help="held-out labeled images for INT8 vs FP32 accuracy, DIR/<label>/* "
                   "or a path,label CSV (default: the calibration images when they are labeled)")
    q.add_argument("--limit", type=int, default=500, help="calibration images used (default 500)")
    q.add_argument("--latency-runs", type=int, default=200)


def run(args: argparse.Namespace) -> int:
    from router_tools.model_import import import_model, quantize_model

    if args.model_command == "import":
        result = import_model(
            args.model, args.labels, args.out, layout=args.layout, color=args.color, mean=args.mean, std=args.std,
            scale=args.scale, resize=args.resize, interpolation=args.interpolation, output_kind=args.output_kind,
            output=args.output, size=args.size, codec=args.codec, invert=args.invert, name=args.name,
            version=args.version)
        m = result.manifest
        shape = "x".join(str(d) for d in m.input.shape)
        print(f"wrote {result.manifest_path}: {m.name} {m.version}, input {m.input.name} {m.input.dtype} [{shape}]"
              + (f" {m.input.layout} {m.input.color}" if m.input.codec == "image" else " tensor")
              + f", output {m.output_name} ({m.output_kind}), {len(m.labels)} labels; validation run ok")
        for w in result.warnings:
            print(f"warning: {w}")
        for n in result.notes:
            print(f"assumed: {n}")
        return 0
    report = quantize_model(args.dir, args.calibration_data, args.out, limit=args.limit,
                            latency_runs=args.latency_runs, eval_data=args.eval_data)
    for line in report.lines():
        print(line)
    return 0
