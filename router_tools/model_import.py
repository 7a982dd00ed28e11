"""Bring your own model: import a user's ONNX classifier into a manifest, and quantize it to INT8.

``import_model`` reads the graph's single input and its output with onnxruntime, takes what the
graph cannot tell (colour order, normalisation, resize policy) from the caller or from stated
defaults, writes ``DIR/model.json`` + a copy of the model (its sha256 in the manifest) + the
labels file, and runs the model once on a synthetic input through the edge runtime to validate.
Everything assumed rather than read from the graph comes back as one line each in ``notes``.

``quantize_model`` makes the INT8 twin with :func:`router_tools.train.quantize_int8` (the
shipped model's recipe: QOperator, per-channel, ``reduce_range``), calibrated on the user's
images through the manifest's own preprocessing, and measures what it cost: file sizes,
accuracy on labeled images, and batch-1 latency of both files timed interleaved in one run.
"""

from __future__ import annotations

import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from edge_model.manifest import InputSpec, Manifest, read_labels, sha256_file
from router.errors import RouterError

MANIFEST_NAME = "model.json"
LABELS_NAME = "labels.txt"
ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(uint8)": "uint8",
              "tensor(int64)": "int64", "tensor(int32)": "int32"}
IMAGENET_HINT = "e.g. ImageNet --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class ModelImportError(RouterError):
    """A model that cannot be imported or quantized as asked (the message says what to change)."""


@dataclass
class ImportResult:
    manifest_path: Path
    manifest: Manifest
    notes: list[str] = field(default_factory=list)  # what was assumed, one line each
    warnings: list[str] = field(default_factory=list)  # what the caller said that the graph contradicts


def _dims(shape) -> list[int]:
    return [d if isinstance(d, int) and d > 0 else -1 for d in shape]


def _floats(text: Optional[str], what: str) -> Optional[list[float]]:
    if text is None:
        return None
    try:
        vals = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ModelImportError(f"--{what} must be a number or comma-separated numbers (one per channel); got {text!r}") from None
    if not vals:
        raise ModelImportError(f"--{what} is empty")
    return vals


def final_op(model_path: Path, output_name: str) -> Optional[str]:
    """The op type of the node that produces ``output_name`` (``Softmax``, ``LogSoftmax``, ``Gemm``...),
    looking through Identity/Reshape/Flatten/Squeeze nodes that do not change values."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    producer = {out: node for node in graph.node for out in node.output}
    name, seen = output_name, 0
    while name in producer and seen < 16:
        node = producer[name]
        if node.op_type not in ("Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast"):
            return node.op_type
        name, seen = node.input[0], seen + 1
    return None


def import_model(model: str | Path, labels: str | Path, out: str | Path, *, layout: Optional[str] = None,
                 color: Optional[str] = None, mean: Optional[str] = None, std: Optional[str] = None,
                 scale: Optional[float] = None, resize: Optional[str] = None, interpolation: Optional[str] = None,
                 output_kind: Optional[str] = None, output: Optional[str] = None, size: Optional[str] = None,
                 codec: Optional[str] = None, invert: Optional[str] = None, name: Optional[str] = None,
                 version: str = "1") -> ImportResult:
    import onnxruntime as ort

    model, out = Path(model), Path(out)
    if not model.is_file():
        raise ModelImportError(f"{model}: model file not found")
    label_list = read_labels(labels)
    try:
        sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own exception types
        raise ModelImportError(f"{model}: onnxruntime cannot load it: {str(exc).splitlines()[0]}") from None
    inputs, outputs = sess.get_inputs(), sess.get_outputs()
    if len(inputs) != 1:
        raise ModelImportError(f"{model}: the graph has {len(inputs)} inputs ({[i.name for i in inputs]}); "
                               "only single-input models are supported")
    inp = inputs[0]
    out_names = [o.name for o in outputs]
    if output is not None and output not in out_names:
        raise ModelImportError(f"{model}: no output {output!r}; the graph's outputs are {out_names}")
    out_info = next(o for o in outputs if o.name == (output or out_names[0]))
    notes: list[str] = []
    warnings: list[str] = []
    if output is None and len(outputs) > 1:
        notes.append(f"output: the graph has {len(outputs)} outputs; using the first, {out_info.name!r} (--output NAME)")
    dtype = ORT_DTYPES.get(inp.type)
    if dtype is None:
        raise ModelImportError(f"{model}: input type {inp.type} is not supported (float32, float16, uint8, int64, int32)")
    shape = _dims(inp.shape)
    shape[0] = -1
    if codec is None:
        codec = "image" if len(shape) == 4 and dtype in ("float32", "float16", "uint8") else "tensor"
        if codec == "tensor":
            notes.append(f"codec: input {dtype} {inp.shape} is not an image; the app passes arrays of that shape (codec tensor)")

    spec: dict = {"name": inp.name, "codec": codec, "dtype": dtype}
    if codec == "image":
        if len(shape) != 4:
            raise ModelImportError(f"{model}: an image model needs a 4-D input [N, C, H, W] or [N, H, W, C]; "
                                   f"got {inp.shape} (use --codec tensor)")
        nchw_c, nhwc_c = shape[1] in (1, 3), shape[3] in (1, 3)
        if layout is None:
            if nchw_c and not nhwc_c:
                layout = "NCHW"
            elif nhwc_c and not nchw_c:
                layout = "NHWC"
            else:
                layout = "NCHW"
                notes.append(f"layout: cannot tell from {inp.shape}; assumed NCHW (--layout NHWC otherwise)")
        elif (layout == "NCHW" and not nchw_c) or (layout == "NHWC" and not nhwc_c):
            other = "NHWC" if layout == "NCHW" else "NCHW"
            raise ModelImportError(f"{model}: --layout {layout} does not fit the input shape {inp.shape} "
                                   f"(no 1 or 3 channels where {layout} has them); did you mean --layout {other}?")
        c_axis, hw = (1, (2, 3)) if layout == "NCHW" else (3, (1, 2))
        channels = shape[c_axis]
        if any(shape[a] < 0 for a in hw):
            if size is None:
                raise ModelImportError(f"{model}: the input's height/width are dynamic ({inp.shape}); "
                                       "pass --size HxW (e.g. --size 224x224)")
            try:
                h, w = (int(v) for v in size.lower().split("x"))
            except ValueError:
                raise ModelImportError(f"--size must be HxW, e.g. 224x224; got {size!r}") from None
            shape[hw[0]], shape[hw[1]] = h, w
        if color is None:
            color = "L" if channels == 1 else "RGB"
            if channels == 3:
                notes.append("color: channel order is not in the graph; assumed RGB (--color BGR for OpenCV/Caffe models)")
        spec.update(shape=shape, layout=layout, color=color)
        if dtype == "uint8":
            if mean or std:
                raise ModelImportError(f"{model}: its input is uint8 pixels (0-255 as they are); drop --mean/--std")
        else:
            m, s = _floats(mean, "mean"), _floats(std, "std")
            if m is None and s is None and scale is None:
                notes.append(f"normalisation: not in the graph; assumed pixel/255 with mean 0, std 1 ({IMAGENET_HINT})")
            spec.update(mean=(m[0] if m and len(m) == 1 else m) if m else 0.0,
                        std=(s[0] if s and len(s) == 1 else s) if s else 1.0)
            if scale is not None:
                spec["scale"] = scale
        if resize is None:
            resize = "letterbox"
            notes.append("resize: not in the graph; assumed letterbox (--resize stretch|shorter_side_center_crop)")
        spec.update(resize=resize, interpolation=interpolation or "bilinear", invert=invert or "never")
    else:
        spec["shape"] = shape

    try:
        input_spec = InputSpec.model_validate(spec)
    except Exception as exc:  # pydantic ValidationError: its first message is the useful one
        errs = getattr(exc, "errors", None)
        msg = errs()[0]["msg"] if callable(errs) else str(exc)
        raise ModelImportError(f"{model}: {msg}") from None

    # Output kind: a graph that ends in Softmax already emits probabilities.
    op = final_op(model, out_info.name)
    detected = {"Softmax": "probabilities", "LogSoftmax": "log_probabilities"}.get(op or "")
    if output_kind is None:
        output_kind = detected or "logits"
        if detected:
            notes.append(f"output kind: the graph ends in {op}; its output is taken as {detected} (not softmaxed again)")
        else:
            notes.append(f"output kind: the graph ends in {op or 'an unknown op'}; taken as logits (--output-kind otherwise)")
    elif detected and output_kind != detected:
        warnings.append(f"the graph ends in {op} but --output-kind {output_kind} was given: its {detected} would be "
                        f"softmaxed twice (every answer would look unsure); using {detected}")
        output_kind = detected
    out_dims = _dims(out_info.shape)
    if len(out_dims) != 2:
        raise ModelImportError(f"{model}: output {out_info.name!r} has shape {out_info.shape}; a classifier's is [N, classes]")
    if out_dims[1] > 0 and out_dims[1] != len(label_list):
        raise ModelImportError(f"{model}: output {out_info.name!r} has {out_dims[1]} classes but {labels} lists "
                               f"{len(label_list)} labels")

    out.mkdir(parents=True, exist_ok=True)
    file_name = model.name if model.suffix == ".onnx" else model.name + ".onnx"
    target = out / file_name
    if target.resolve() != model.resolve():
        shutil.copyfile(model, target)
    (out / LABELS_NAME).write_text("\n".join(label_list) + "\n", encoding="utf-8")
    try:
        manifest = Manifest(
            name=name or model.stem, version=version, file=file_name, sha256=sha256_file(target), precision=(
                "fp16" if dtype == "float16" else "fp32"), labels=label_list, labels_file=LABELS_NAME,
            input=input_spec, output_name=out_info.name, output_kind=output_kind,
            recipe={"imported_from": model.name},
        )
    except Exception as exc:
        errs = getattr(exc, "errors", None)
        raise ModelImportError(f"{model}: {errs()[0]['msg'] if callable(errs) else exc}") from None
    manifest_path = out / MANIFEST_NAME
    manifest.save(manifest_path)
    validate(manifest_path)
    return ImportResult(manifest_path, manifest, notes, warnings)


def synthetic_input(config, seed: int = 0):
    """One input a model of ``config`` accepts: a Pillow-drawn RGB picture for images (through the
    real decoding and resizing), zeros of the declared shape and dtype for tensors."""
    if config.codec == "tensor":
        return np.zeros(tuple(d if d > 0 else 8 for d in config.sample_shape), dtype=config.np_dtype)
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    im = Image.new("RGB", (96, 64), tuple(int(v) for v in rng.integers(0, 256, 3)))
    ImageDraw.Draw(im).ellipse((20, 10, 76, 54), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return im


def validate(manifest_path: Path) -> np.ndarray:
    """Load through the edge runtime (sha256, shapes, warm-up) and classify one synthetic input."""
    from edge_model.errors import EdgeModelError
    from edge_model.runtime import OnnxClassifier

    try:
        clf = OnnxClassifier(manifest_path)
        probs = clf.classify([synthetic_input(clf.preprocess_config)])
    except EdgeModelError as exc:
        raise ModelImportError(f"validation run failed: {exc}") from None
    if probs.shape != (1, len(clf.labels)) or not np.isfinite(probs).all() or abs(float(probs.sum()) - 1) > 1e-3:
        raise ModelImportError(f"validation run gave no distribution over {len(clf.labels)} labels: {probs}")
    return probs


# ----------------------------------------------------------------------------- quantize

@dataclass
class QuantizeReport:
    manifest_path: Path
    fp32_bytes: int
    int8_bytes: int
    calibration_images: int
    accuracy: Optional[tuple[float, float, int]] = None  # (fp32, int8, n)
    accuracy_on: str = "the calibration images"  # which images the accuracy was measured on
    latency_ms: Optional[tuple[float, float]] = None  # median batch-1 (fp32, int8), interleaved

    def lines(self) -> list[str]:
        out = [f"wrote {self.manifest_path} (INT8, FP32 twin recorded)",
               f"file size: FP32 {self.fp32_bytes / 1024:.1f} KiB, INT8 {self.int8_bytes / 1024:.1f} KiB "
               f"({self.int8_bytes / self.fp32_bytes:.2f}x)",
               f"calibrated on {self.calibration_images} images"]
        if self.accuracy:
            f, i, n = self.accuracy
            out.append(f"accuracy on {n} labeled images ({self.accuracy_on}): FP32 {f:.2%}, INT8 {i:.2%} "
                       f"({(i - f) * 100:+.2f} pt)")
        else:
            out.append("accuracy: not measured (give --eval-data DIR/<label>/*, or calibration images in such folders)")
        if self.latency_ms:
            f, i = self.latency_ms
            verdict = (f"INT8 is SLOWER here ({i / f:.2f}x the FP32 time): keep the FP32 model on this machine"
                       if i > f else f"INT8 is {f / i:.2f}x faster here")
            out.append(f"batch-1 latency (median, interleaved, this machine): FP32 {f:.3f} ms, INT8 {i:.3f} ms -- {verdict}")
        return out


def find_manifest(directory: Path) -> Path:
    directory = Path(directory)
    if directory.is_file():
        return directory
    if (directory / MANIFEST_NAME).is_file():
        return directory / MANIFEST_NAME
    found = sorted(directory.glob("*.json"))
    if len(found) != 1:
        raise ModelImportError(f"{directory}: expected {MANIFEST_NAME} (from 'hybrid-router model import') in it")
    return found[0]


def _calibration_set(data: Path, manifest: Manifest, config, limit: int):
    """(pixels, labels or None): labeled when ``data`` is ``DIR/<label>/*`` over the model's labels."""
    from edge_model.errors import InputError
    from edge_model.preprocess import to_pixels
    from router_tools.labeled import LabeledDataError, load_folder

    data = Path(data)
    if not data.is_dir():
        raise ModelImportError(f"{data}: calibration data must be a folder of images (or DIR/<label>/ folders)")
    try:
        labeled = load_folder(data, manifest.labels, config, None)
        if len(labeled):
            idx = np.random.default_rng(0).permutation(len(labeled))[:limit] if len(labeled) > limit else None
            return (labeled.pixels, labeled.labels) if idx is None else (labeled.pixels[idx], labeled.labels[idx])
    except LabeledDataError:
        pass  # not a labeled layout: any images below the folder
    files = sorted(p for p in data.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not files:
        raise ModelImportError(f"{data}: no images ({', '.join(IMAGE_SUFFIXES)}) found for calibration")
    pixels = []
    for f in files:
        try:
            pixels.append(to_pixels(f, config))
        except InputError as exc:
            raise ModelImportError(f"{f}: {exc}") from None
    return np.stack(pixels), None


def quantize_model(src: str | Path, calibration_data: str | Path, out: str | Path, *, limit: int = 500,
                   latency_runs: int = 200, eval_data: str | Path | None = None) -> QuantizeReport:
    """``eval_data``: labeled images (``DIR/<label>/*`` or a ``path,label`` CSV) to measure INT8 vs FP32
    accuracy on; without it, the calibration images when they are labeled (slightly flattering
    to INT8, whose ranges were fitted on them)."""
    from edge_model.preprocess import PreprocessConfig, normalise
    from edge_model.runtime import OnnxClassifier
    from router_tools.train import QUANTIZATION, quantize_int8

    src_manifest = find_manifest(Path(src))
    manifest = Manifest.load(src_manifest)
    if manifest.precision == "int8":
        raise ModelImportError(f"{src_manifest}: already INT8; quantize its FP32 twin")
    if manifest.input.codec != "image":
        raise ModelImportError(f"{src_manifest}: calibration reads images; a tensor-codec model needs its own reader")
    config = PreprocessConfig.from_input_spec(manifest.input)
    pixels, labels = _calibration_set(Path(calibration_data), manifest, config, limit)
    x = np.ascontiguousarray(normalise(pixels, config).reshape(len(pixels), *config.sample_shape))

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fp32_name = Path(manifest.file).stem + "-fp32.onnx"
    int8_name = Path(manifest.file).stem + "-int8.onnx"
    shutil.copyfile(src_manifest.parent / manifest.file, out / fp32_name)
    try:
        quantize_int8(out / fp32_name, out / int8_name, None, model_input=x, input_name=manifest.input.name)
    except Exception as exc:  # onnxruntime.quantization raises plain exceptions
        raise ModelImportError(f"quantization failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    fp32_manifest = manifest.model_copy(update={"file": fp32_name, "sha256": sha256_file(out / fp32_name)})
    fp32_manifest.save(out / "model-fp32.json")
    recipe = {**manifest.recipe, "quantization": {**QUANTIZATION,
              "calibration": f"MinMax over {len(x)} images of {Path(calibration_data).name}"}}
    int8_manifest = manifest.model_copy(update={
        "file": int8_name, "sha256": sha256_file(out / int8_name), "precision": "int8", "twin": fp32_name,
        "recipe": recipe})
    int8_path = out / MANIFEST_NAME
    int8_manifest.save(int8_path)
    if manifest.labels_file:
        (out / manifest.labels_file).write_text("\n".join(manifest.labels) + "\n", encoding="utf-8")

    fp32, int8 = OnnxClassifier(out / "model-fp32.json"), OnnxClassifier(int8_path)
    report = QuantizeReport(int8_path, (out / fp32_name).stat().st_size, (out / int8_name).stat().st_size, len(x))
    if eval_data is not None:
        from router_tools.labeled import LabeledDataError, load_labeled

        try:
            held_out = load_labeled(eval_data, labels=manifest.labels, config=config)
        except LabeledDataError as exc:
            raise ModelImportError(f"--eval-data: {exc}") from None
        x = np.ascontiguousarray(normalise(held_out.pixels, config).reshape(len(held_out), *config.sample_shape))
        labels, report.accuracy_on = held_out.labels, Path(eval_data).name
    if labels is not None:
        acc = [float((np.concatenate([clf.predict_proba(x[i:i + 512]) for i in range(0, len(x), 512)]).argmax(1)
                      == labels).mean()) for clf in (fp32, int8)]
        report.accuracy = (acc[0], acc[1], len(labels))
        int8_manifest.metrics.update({"accuracy_int8": round(acc[1], 5), "accuracy_fp32": round(acc[0], 5),
                                      "accuracy_images": len(labels)})
        int8_manifest.save(int8_path)
    report.latency_ms = interleaved_latency(fp32, int8, x[:1], latency_runs)
    return report


def interleaved_latency(a, b, x: np.ndarray, runs: int) -> tuple[float, float]:
    """Median batch-1 milliseconds of ``a`` and ``b`` timed alternately (order swapped each round),
    so load from other processes falls on both alike."""
    times: tuple[list[float], list[float]] = ([], [])
    for r in range(runs):
        for k in ((0, 1) if r % 2 == 0 else (1, 0)):
            clf = (a, b)[k]
            t0 = time.perf_counter()
            clf.logits(x)
            times[k].append(time.perf_counter() - t0)
    return statistics.median(times[0]) * 1000, statistics.median(times[1]) * 1000
