"""Bring your own model: generated ONNX classifiers (onnx helper API, random weights) imported with
``hybrid-router model import``, run on the edge, served by the real cloud service and answered by
the router under the right labels; and the refusals (label mismatch, wrong layout, softmax twice)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edge_model.errors import ArtifactError  # noqa: E402
from edge_model.manifest import Manifest, labels_digest  # noqa: E402
from edge_model.preprocess import PreprocessConfig, preprocess  # noqa: E402
from edge_model.runtime import OnnxClassifier  # noqa: E402
from router import Router  # noqa: E402
from router.errors import CloudIncompatible, PredictionUnavailable  # noqa: E402
from router.policy import parse_policy  # noqa: E402
from router_tools.cli import main as cli_main  # noqa: E402
from router_tools.model_import import ModelImportError, import_model, quantize_model  # noqa: E402
from tests.support.cloud import running_service  # noqa: E402

IMAGENET_MEAN, IMAGENET_STD = "0.485,0.456,0.406", "0.229,0.224,0.225"
ONNX_TYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "uint8": TensorProto.UINT8,
              "int64": TensorProto.INT64}


def make_onnx(path: Path, sample_shape, n_classes: int, *, dtype="float32", softmax=None, seed=0) -> Path:
    """input [N, *sample_shape] -> (Cast) -> Flatten -> Gemm -> (Softmax | LogSoftmax)."""
    rng = np.random.default_rng(seed)
    nodes, x = [], "input"
    if dtype != "float32":
        nodes.append(helper.make_node("Cast", [x], ["xf"], to=TensorProto.FLOAT))
        x = "xf"
    feat = int(np.prod(sample_shape))
    w = numpy_helper.from_array((rng.standard_normal((feat, n_classes)) * (3.0 / np.sqrt(feat))).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.standard_normal(n_classes).astype(np.float32), "B")
    nodes.append(helper.make_node("Flatten", [x], ["flat"], axis=1))
    out = "logits" if softmax is None else "z"
    nodes.append(helper.make_node("Gemm", ["flat", "W", "B"], [out]))
    if softmax:
        nodes.append(helper.make_node(softmax, ["z"], ["probs"], axis=1))
        out = "probs"
    graph = helper.make_graph(
        nodes, "byom", [helper.make_tensor_value_info("input", ONNX_TYPES[dtype], ["N", *sample_shape])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", n_classes])], [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def photo(seed: int = 0, size=(120, 90)) -> Image.Image:
    """A colour picture made with Pillow: a gradient sky, a disc and a box in distinct colours."""
    rng = np.random.default_rng(seed)
    w, h = size
    grad = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * np.array([0.2, 0.5, 1.0], np.float32)
    im = Image.fromarray(np.broadcast_to(grad, (h, w, 3)).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(im)
    d.ellipse((10, 10, 60, 60), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    d.rectangle((70, 30, 110, 80), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return im


def labels_file(tmp: Path, labels) -> Path:
    p = tmp / f"labels-{len(labels)}.txt"
    p.write_text("\n".join(labels) + "\n")
    return p


THREE = ["cat", "dog", "bird, small"]  # a comma inside a name: published as JSON, not comma-joined
FIVE = ["a", "b", "c", "d", "e"]

# name: (sample shape, classes, import options, the input the edge gets)
CASES = {
    "rgb_nchw_224_imagenet": ((3, 224, 224), THREE, dict(mean=IMAGENET_MEAN, std=IMAGENET_STD,
                                                         resize="shorter_side_center_crop"), "photo"),
    "nhwc_32": ((32, 32, 3), FIVE, dict(), "photo"),
    "gray_1ch": ((1, 28, 28), FIVE, dict(mean="0.5", std="0.5"), "photo"),
    "uint8_input": ((3, 64, 64), THREE, dict(dtype="uint8"), "photo"),
    "probabilities_output": ((3, 32, 32), THREE, dict(softmax="Softmax"), "photo"),
    "tensor_tokens": ((16,), FIVE, dict(dtype="int64"), "tokens"),
}


def _import(tmp: Path, case: str):
    shape, labels, opts, _ = CASES[case]
    opts = dict(opts)
    dtype, softmax = opts.pop("dtype", "float32"), opts.pop("softmax", None)
    src = make_onnx(tmp / f"{case}.onnx", shape, len(labels), dtype=dtype, softmax=softmax)
    return import_model(src, labels_file(tmp, labels), tmp / case, **opts)


def _input(case: str):
    if CASES[case][3] == "tokens":
        return np.arange(16, dtype=np.int64) % 7
    return photo(3)


@pytest.mark.parametrize("case", list(CASES))
def test_import_then_edge_answers_with_its_labels(tmp_path, case):
    result = _import(tmp_path, case)
    m = Manifest.load(result.manifest_path)
    labels = CASES[case][1]
    assert m.labels == labels and m.labels_file == "labels.txt" and m.input.invert == "never"
    edge = OnnxClassifier(result.manifest_path)
    probs = edge.classify([_input(case)])
    assert probs.shape == (1, len(labels)) and abs(float(probs.sum()) - 1) < 1e-5
    if case == "probabilities_output":
        assert m.output_kind == "probabilities" and any("Softmax" in n for n in result.notes)
        # Not softmaxed again: the edge's probabilities are the graph's own.
        x = edge.preprocess_batch([_input(case)])
        np.testing.assert_allclose(probs, edge.session.run(None, {"input": x})[0], rtol=1e-6)
    if case == "tensor_tokens":
        assert m.input.codec == "tensor" and any("codec" in n for n in result.notes)
    if case == "rgb_nchw_224_imagenet":
        assert not any("normalisation" in n for n in result.notes)
        assert any(n.startswith("color") for n in result.notes)  # RGB vs BGR is not in a graph: said so


def test_per_channel_normalisation_and_layouts_are_exact():
    rgb = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    want = (rgb.astype(np.float32) / np.float32(255) - np.array(mean, np.float32)) / np.array(std, np.float32)
    nchw = PreprocessConfig(height=32, width=32, color="RGB", layout="NCHW", mean=mean, std=std, invert="never")
    np.testing.assert_array_equal(preprocess(rgb, nchw), want.transpose(2, 0, 1))
    nhwc = PreprocessConfig(height=32, width=32, color="BGR", layout="NHWC", mean=mean[::-1], std=std[::-1],
                            invert="never")
    np.testing.assert_array_equal(preprocess(rgb, nhwc), want[..., ::-1])
    u8 = PreprocessConfig(height=32, width=32, color="RGB", layout="NCHW", dtype="uint8", mean=0.0, std=1.0,
                          invert="never")
    np.testing.assert_array_equal(preprocess(rgb, u8), rgb.transpose(2, 0, 1))


def test_bright_photo_is_not_inverted_unless_asked():
    white = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(white).ellipse((16, 16, 48, 48), fill=(200, 30, 30))
    cfg = PreprocessConfig(height=32, width=32, color="RGB", mean=0.0, std=1.0, invert="never")
    from edge_model.preprocess import to_pixels

    assert to_pixels(white, cfg)[:, 0, 0].tolist() == [255, 255, 255]
    assert to_pixels(white, PreprocessConfig(**{**cfg.__dict__, "invert": "auto"}))[:, 0, 0].tolist() == [0, 0, 0]


def test_shipped_manifests_keep_auto_inversion():
    from edge_model.runtime import DEFAULT_EDGE_MANIFEST

    m = Manifest.load(DEFAULT_EDGE_MANIFEST)
    assert m.input.invert == "auto" and PreprocessConfig.from_input_spec(m.input) == PreprocessConfig(
        mean=m.input.mean, std=m.input.std)


# ----------------------------------------------------------------------------- refusals

def test_wrong_layout_declared_is_refused(tmp_path):
    src = make_onnx(tmp_path / "m.onnx", (3, 224, 224), 3)
    with pytest.raises(ModelImportError, match="--layout NHWC does not fit"):
        import_model(src, labels_file(tmp_path, THREE), tmp_path / "out", layout="NHWC")
    # And a hand-edited manifest that says NHWC for an NCHW graph does not load.
    good = import_model(src, labels_file(tmp_path, THREE), tmp_path / "ok").manifest_path
    raw = json.loads(good.read_text())
    raw["input"].update(layout="NHWC", shape=[-1, 224, 224, 3])
    good.write_text(json.dumps(raw))
    with pytest.raises(ArtifactError, match="graph input"):
        OnnxClassifier(good)


def test_softmax_twice_is_detected(tmp_path):
    src = make_onnx(tmp_path / "m.onnx", (3, 32, 32), 3, softmax="Softmax")
    result = import_model(src, labels_file(tmp_path, THREE), tmp_path / "out", output_kind="logits")
    assert result.manifest.output_kind == "probabilities"
    assert any("softmaxed twice" in w for w in result.warnings)
    raw = json.loads(result.manifest_path.read_text())
    raw["output_kind"] = "logits"
    result.manifest_path.write_text(json.dumps(raw))
    with pytest.raises(ArtifactError, match="output_kind: probabilities"):
        OnnxClassifier(result.manifest_path)


def test_label_count_mismatch_at_import(tmp_path):
    src = make_onnx(tmp_path / "m.onnx", (3, 32, 32), 5)
    with pytest.raises(ModelImportError, match="5 classes but"):
        import_model(src, labels_file(tmp_path, THREE), tmp_path / "out")


def test_cli_import_prints_what_it_assumed(tmp_path, capsys):
    src = make_onnx(tmp_path / "m.onnx", (32, 32, 3), 3)
    rc = cli_main(["model", "import", str(src), "--labels", str(labels_file(tmp_path, THREE)), "--out",
                   str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert rc == 0 and "NHWC RGB" in out and "assumed: color" in out and "assumed: normalisation" in out


# ----------------------------------------------------------------------------- served by the real service

def _router(url: str, edge: OnnxClassifier, model_name: str, **endpoint) -> Router:
    policy = parse_policy({
        "confidence_threshold": 0.5, "default_deadline_ms": 20000, "decision_log": False,
        "cloud": {"endpoints": [{"url": url, "name": "svc", "model": model_name, **endpoint}],
                  "retry": {"max_attempts": 1}, "per_try_timeout_ms": 15000},
    })
    return Router(policy, edge_model=edge)


@pytest.mark.parametrize("case", ["rgb_nchw_224_imagenet", "nhwc_32", "uint8_input", "tensor_tokens"])
def test_served_by_the_real_service_router_answers_with_the_right_labels(tmp_path, case):
    result = _import(tmp_path, case)
    edge = OnnxClassifier(result.manifest_path)
    item = _input(case)
    want = edge.classify([item])[0]
    with running_service({"model": {"manifest": str(result.manifest_path), "name": "byom"}}) as svc:
        with _router(svc.url, edge, "byom") as router:
            p = router.predict(item, mode="cloud_only")
    labels = CASES[case][1]
    assert p.source == "cloud" and p.label == labels[int(np.argmax(want))]
    # Same model on both sides: the cloud's probabilities are the edge's (UINT8 pixels in the model's layout).
    np.testing.assert_allclose(p.probabilities, want, atol=1e-5)


def test_label_mismatch_refuses_the_endpoint(tmp_path):
    """A 3-label edge in front of the shipped 10-label service: refused at first contact, naming both
    label sets; nothing is answered under the wrong name, and the edge still answers when allowed."""
    edge = OnnxClassifier(_import(tmp_path, "gray_1ch").manifest_path)  # labels a..e
    with running_service() as svc:
        with _router(svc.url, edge, "fashion-mnist") as router:
            with pytest.raises(PredictionUnavailable) as info:
                router.predict(photo(1), mode="cloud_only")
            err = info.value.cloud_error
            assert isinstance(err, CloudIncompatible) and err.category == "incompatible"
            assert "Ankle boot" in str(err) and "'a', 'b'" in str(err)
            p = router.predict(photo(1), mode="prefer_cloud")  # falls back to the edge, under its own labels
            assert p.source == "edge" and p.label in "abcde" and p.cloud_failure.category == "incompatible"
        with _router(svc.url, edge, "fashion-mnist", labels_check="off") as router:
            # off: the label check is skipped, but the class count still refuses 10 answers for 5 labels.
            with pytest.raises(PredictionUnavailable) as info:
                router.predict(photo(1), mode="cloud_only")
            assert not isinstance(info.value.cloud_error, CloudIncompatible)


def test_labels_check_unit():
    from router.cloud import ModelInfo, check_labels
    from router.policy import Endpoint

    ep = Endpoint(url="http://127.0.0.1:1", name="x")
    same = ModelInfo("input", "FP32", (-1, 3), labels=tuple(THREE))
    assert check_labels(same, ep, THREE) is None
    assert check_labels(ModelInfo("input", "FP32", (-1, 3), labels_sha256=labels_digest(THREE)), ep, THREE) is None
    assert isinstance(check_labels(ModelInfo("input", "FP32", (-1, 3), labels=("x", "y", "z")), ep, THREE),
                      CloudIncompatible)
    silent = ModelInfo("input", "FP32", (-1, 3))
    assert check_labels(silent, ep, THREE) is None  # default: warn
    assert isinstance(check_labels(silent, Endpoint(url="http://127.0.0.1:1", name="x", labels_check="require"),
                                   THREE), CloudIncompatible)
    assert check_labels(ModelInfo("input", "FP32", (-1, 3), labels=("x", "y", "z")),
                        Endpoint(url="http://127.0.0.1:1", name="x", labels_check="off"), THREE) is None


def test_quantize_reports_sizes_accuracy_and_latency(tmp_path):
    result = _import(tmp_path, "nhwc_32")
    edge = OnnxClassifier(result.manifest_path)
    data = tmp_path / "data"
    for i in range(30):  # labeled by the FP32 model itself: DIR/<label>/*.png
        im = photo(i, size=(40, 40))
        label = FIVE[int(edge.classify([im])[0].argmax())]
        (data / label).mkdir(parents=True, exist_ok=True)
        im.save(data / label / f"{i}.png")
    report = quantize_model(result.manifest_path.parent, data, tmp_path / "int8", latency_runs=20)
    m = Manifest.load(report.manifest_path)
    assert m.precision == "int8" and m.twin and (report.manifest_path.parent / m.twin).is_file()
    assert report.accuracy is not None and report.accuracy[0] == 1.0 and report.accuracy[2] == 30
    text = "\n".join(report.lines())
    assert "file size" in text and "batch-1 latency" in text and ("SLOWER" in text or "faster" in text)
    OnnxClassifier(report.manifest_path).classify([photo(0)])


# -- the edge's pixels reach a cloud model of another layout / channel order / size ------------------

@pytest.mark.parametrize("edge_in, cloud_in, cloud_kw", [
    ((3, 32, 32), (32, 32, 3), {}),                      # NCHW edge, NHWC cloud: transposed
    ((32, 32, 3), (3, 32, 32), {}),                      # NHWC edge, NCHW cloud
    ((3, 32, 32), (3, 32, 32), {"color": "BGR"}),        # same layout, other channel order: reversed
    ((32, 32, 3), (3, 32, 32), {"color": "BGR"}),        # both at once
])
def test_pixels_are_arranged_as_the_cloud_model_takes_them(tmp_path, edge_in, cloud_in, cloud_kw):
    """Through the real service the router's answer is the cloud model's own answer on the same photo:
    same element count in another order would otherwise be read silently wrong."""
    lf = labels_file(tmp_path, FIVE)
    e = import_model(make_onnx(tmp_path / "e.onnx", edge_in, 5, seed=1), lf, tmp_path / "e", color="RGB")
    c = import_model(make_onnx(tmp_path / "c.onnx", cloud_in, 5, seed=2), lf, tmp_path / "c",
                     **{"color": "RGB", **cloud_kw})
    cloud, edge = OnnxClassifier(c.manifest_path), OnnxClassifier(e.manifest_path)
    im = photo(3)
    want = cloud.classify([im])[0]
    with running_service({"model": {"manifest": str(c.manifest_path), "name": "byom"}}) as svc:
        with _router(svc.url, edge, "byom") as router:
            got = router.predict(im, mode="cloud_only")
    assert got.source == "cloud"
    np.testing.assert_allclose(got.probabilities, want, atol=1e-4)


@pytest.mark.parametrize("edge_in, edge_color, cloud_in", [
    ((3, 32, 32), "RGB", (48, 48, 3)),   # a small RGB edge in front of a larger NHWC cloud model
    ((1, 28, 28), "L", (3, 40, 40)),     # a grayscale edge in front of a colour cloud model
])
def test_a_cloud_model_of_another_input_size_gets_pixels_made_from_the_callers_image(
        tmp_path, edge_in, edge_color, cloud_in):
    """The cloud answers what it answers on the photo itself (its own size, channels, layout), never
    the edge's small pixels scaled up; audits take the same path."""
    lf = labels_file(tmp_path, FIVE)
    e = import_model(make_onnx(tmp_path / "e.onnx", edge_in, 5, seed=1), lf, tmp_path / "e", color=edge_color)
    c = import_model(make_onnx(tmp_path / "c.onnx", cloud_in, 5, seed=2), lf, tmp_path / "c", color="RGB")
    cloud = OnnxClassifier(c.manifest_path)
    ims = [photo(1), photo(4, size=(64, 200))]
    want = cloud.classify(ims)
    with running_service({"model": {"manifest": str(c.manifest_path), "name": "byom"}}) as svc:
        with _router(svc.url, OnnxClassifier(e.manifest_path), "byom") as router:
            got = [router.predict(im, mode="cloud_only") for im in ims]
            batch = router.predict_batch(ims, mode="cloud_only")
    for g, b, w in zip(got, batch, want):
        assert g.source == "cloud" and b.source == "cloud"
        np.testing.assert_allclose(g.probabilities, w, atol=1e-4)
        np.testing.assert_allclose(b.probabilities, w, atol=1e-4)


def test_an_fp32_only_endpoint_of_another_input_size_is_refused_naming_both_shapes(tmp_path):
    lf = labels_file(tmp_path, FIVE)
    e = import_model(make_onnx(tmp_path / "e.onnx", (3, 32, 32), 5, seed=1), lf, tmp_path / "e", color="RGB")
    c = import_model(make_onnx(tmp_path / "c.onnx", (3, 48, 48), 5, seed=2), lf, tmp_path / "c", color="RGB")
    with running_service({"model": {"manifest": str(c.manifest_path), "name": "byom"}}) as svc:
        with _router(svc.url, OnnxClassifier(e.manifest_path), "byom", input_datatype="FP32") as router:
            with pytest.raises(PredictionUnavailable) as info:
                router.predict(photo(1), mode="cloud_only")
            p = router.predict(photo(1), mode="prefer_cloud")  # the edge answers instead
    err = info.value.cloud_error
    assert isinstance(err, CloudIncompatible)
    assert "[-1, 3, 48, 48]" in str(err) and "[-1, 3, 32, 32]" in str(err)
    assert p.source == "edge" and p.cloud_failure.category == "incompatible"


@pytest.mark.parametrize("edge, tail, color, want", [
    (((1, 28, 28), "NCHW", "L"), (1, 28, 28), None, (None, None)),
    (((1, 28, 28), "NCHW", "L"), (28, 28), None, (None, None)),          # squeezed: one channel, one order
    (((1, 28, 28), "NCHW", "L"), (784,), None, (None, None)),            # flat
    (((3, 8, 8), "NCHW", "RGB"), (3, 8, 8), "RGB", (None, None)),
    (((3, 8, 8), "NCHW", "RGB"), (8, 8, 3), None, ((0, 2, 3, 1), None)),
    (((8, 8, 3), "NHWC", "RGB"), (3, 8, 8), None, ((0, 3, 1, 2), None)),
    (((8, 8, 3), "NHWC", "RGB"), (8, 8, 3), "BGR", (None, 3)),
    (((3, 8, 8), "NCHW", "BGR"), (8, 8, 3), "RGB", ((0, 2, 3, 1), 3)),
    (((3, 8, 8), "NCHW", "RGB"), (3, -1, -1), None, (None, None)),       # dynamic size
    (((3, 8, 8), "NCHW", "RGB"), (3, 16, 16), None, "refused"),   # no edge config: nothing to make pixels with
    (((1, 28, 28), "NCHW", "L"), (3, 28, 28), None, "refused"),
    (((3, 8, 8), "NCHW", "RGB"), (8, 8), None, "refused"),
])
def test_plan_input_table(edge, tail, color, want):
    from router.cloud import ModelInfo, plan_input

    got = plan_input(ModelInfo("input", "UINT8", (-1, *tail), color=color), edge)
    if want == "refused":
        assert isinstance(got, str) and "edge model makes" in got
    else:
        assert (got.axes, got.flip_axis) == want


@pytest.mark.parametrize("tail, color, datatype, want", [
    ((3, 16, 16), None, "UINT8", ((3, 16, 16), "RGB", "NCHW")),
    ((16, 16, 3), "BGR", "UINT8", ((16, 16, 3), "BGR", "NHWC")),
    ((1, 40, 40), None, "UINT8", ((1, 40, 40), "L", "NCHW")),
    ((40, 40), None, "UINT8", ((40, 40), "L", "NCHW")),
    ((3, -1, -1), None, "UINT8", None),             # dynamic size: the edge's, which fits as is
    ((3, 16, 16), None, "FP32", "refused"),         # normalisation unknown: refused
    ((5, 16, 16), None, "UINT8", "refused"),        # not an image shape
])
def test_plan_input_makes_pixels_for_another_geometry(tail, color, datatype, want):
    from router.cloud import ModelInfo, plan_input

    edge = PreprocessConfig(height=8, width=8, color="RGB", layout="NCHW", mean=0.5, std=0.25)
    got = plan_input(ModelInfo("input", datatype, (-1, *tail), color=color,
                               preprocess={"resize": "stretch", "interpolation": "bilinear"}), edge)
    if want == "refused":
        assert isinstance(got, str) and "edge model makes" in got
    elif want is None:
        assert got.pixels_config is None
    else:
        cfg = got.pixels_config
        assert (got.pixels_tail, cfg.color, cfg.layout) == want
        assert (cfg.resize, cfg.interpolation) == ("stretch", "bilinear")  # as the server resizes
