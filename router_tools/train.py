"""Train, export, quantize and calibrate the two shipped models (needs the ``train`` extra).

    python -m router_tools.train edge  [--data-dir DIR] [--epochs N] [--seed S] [--out DIR]
    hybrid-router train edge --recipe edge-1.1    (edge 1.1.0 -> router_tools/data/releases/edge-1.1.0/)
    python -m router_tools.train cloud [...]
    hybrid-router train edge|cloud [...]          (same thing)
    hybrid-router train cloud --member 0 & hybrid-router train cloud --member 1; \
        hybrid-router train cloud --package       (the cloud's members in parallel processes)

Pipeline (all seeded): read the 55k training remainder -> train a CNN in torch (the cloud
model: each member of a 2-CNN ensemble) -> export ONNX with a dynamic batch dimension (the
cloud: members' log-probabilities averaged; flip TTA too if the recipe asks) -> (edge) static
INT8 quantization with onnxruntime over held-out images -> fit temperature on the shipped
validation split -> measure the ONNX artifacts on the shipped test split -> write the manifest
with sha256, metrics and recipe.

torch is imported here only; nothing at run time imports this module.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from router_tools import datasets as ds
from edge_model.calibration import expected_calibration_error, fit_temperature, softmax
from edge_model.manifest import InputSpec, Manifest, sha256_file

MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST training-set pixel statistics (of x / 255)
PACKAGE_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = {
    "edge": PACKAGE_ROOT / "edge_model" / "artifacts",
    "cloud": PACKAGE_ROOT / "cloud_service" / "artifacts",
    # Released (not bundled) models: published through the signed channel (``hybrid-router release``).
    "edge-1.1": PACKAGE_ROOT / "router_tools" / "data" / "releases" / "edge-1.1.0",
}
# Manifest version a named recipe writes unless --version says otherwise.
RECIPE_VERSION = {"edge-1.1": "1.1.0"}
# Escalation share a named recipe's INT8 manifest is calibrated to on the validation split
# (the bundled 1.0.1's: the shipped policy's threshold 0.8987 escalates 25 % there).
RECIPE_CALIBRATION = {"edge-1.1": 0.25}


@dataclass
class Recipe:
    kind: str
    epochs: int
    # Network of ``build_model``; None: the kind's original one.
    arch: str | None = None
    batch_size: int = 128
    lr: float = 0.05
    weight_decay: float = 5e-4
    seed: int = 0
    crop_pad: int = 2
    hflip: bool = True
    erase_p: float = 0.0
    # Dropout after each of the cloud model's three conv stages and before its last layer.
    dropout: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4)
    label_smoothing: float = 0.0
    # NHWC activations: ~20 % faster conv training on CPU; changes only float rounding.
    channels_last: bool = False
    # Horizontal-flip test-time augmentation written into the exported graph (2x FLOPs).
    flip_tta: bool = False
    train_limit: int | None = None
    extra: dict = field(default_factory=dict)


RECIPES = {
    "edge": Recipe(kind="edge", epochs=30, lr=0.05, weight_decay=3e-4),
    # flip_tta off: on the validation split it gained one image in 5000 (+0.02 pt) for twice the FLOPs,
    # and the service's throughput paid for it (bench/cloud_throughput.py).
    "cloud": Recipe(kind="cloud", epochs=30, lr=0.05, weight_decay=5e-4, erase_p=0.5, channels_last=True),
    # Edge 1.1.0 candidate (not trained in full yet): twice 1.0's FLOPs (still <= 1/20 of the cloud's)
    # spent where INT8 pays at batch 1 on AVX2 (see build_model); 1.0's 30 epochs.
    "edge-1.1": Recipe(kind="edge", arch="edge-1.1", epochs=30, lr=0.05, weight_decay=3e-4, channels_last=True),
}
# The cloud model is an ensemble of members that share the architecture and differ in seed
# (recipe seed + index) and regularisation; the graph averages their log-probabilities.
# 1.0.0, a single member trained 20 epochs, reached 93.82 % (94.00 % with flip TTA): short of 94.5 %.
MEMBERS = {
    "edge": ({},),
    "cloud": ({}, {"dropout": (0.0, 0.0, 0.0, 0.3), "label_smoothing": 0.1}),
    "edge-1.1": ({},),
}


def build_model(kind: str, dropout: tuple[float, ...] = Recipe.dropout):
    import torch.nn as nn

    def block(cin, cout, stride=1):
        return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    if kind == "edge":
        # 1.47 M MACs: three conv stages and a linear head; sized to stay under 1/20 of the cloud model's FLOPs.
        layers = [
            *block(1, 16), nn.MaxPool2d(2),          # 14x14
            *block(16, 32), nn.MaxPool2d(2),         # 7x7
            *block(32, 32), nn.MaxPool2d(2),         # 3x3
            nn.Flatten(), nn.Linear(32 * 9, 10),
        ]
    elif kind == "edge-1.1":
        # 2.77 M MACs (5.54 MFLOPs, 1/21 of the cloud's). Shaped so that the INT8 graph beats its FP32
        # twin at batch 1 on an AVX2 CPU without VNNI (1.0's INT8 is ~1.3x slower than its twin there):
        # a 1-channel conv is the slowest layer in INT8 (K = 9: no GEMM to win, requantising a
        # full-size output), so the stem has stride 2 and works at 14x14; the MACs sit in convs with
        # 32 input channels where the U8S8 GEMM beats the FP32 one. Measured (briefly trained, side by
        # side): INT8 0.89x its twin's session.run time, 1.0 1.50x. Global average pooling instead of
        # the 3x3 flatten was faster still (0.86x) but underfit: 87.6 % after 6 epochs, and 77.4 %
        # against 85.9 % (this) and 85.7 % (1.0) on validation after 2 epochs of 20k images.
        layers = [
            *block(1, 32, stride=2),                 # 14x14
            *block(32, 32), nn.MaxPool2d(2),         # 7x7
            *block(32, 64), nn.MaxPool2d(2),         # 3x3
            nn.Flatten(), nn.Linear(64 * 9, 10),
        ]
    elif kind == "cloud":
        layers = [
            *block(1, 32), *block(32, 32), nn.MaxPool2d(2), nn.Dropout(dropout[0]),      # 14x14
            *block(32, 64), *block(64, 64), nn.MaxPool2d(2), nn.Dropout(dropout[1]),    # 7x7
            *block(64, 128), *block(128, 128), nn.MaxPool2d(2), nn.Dropout(dropout[2]), # 3x3
            nn.Flatten(), nn.Linear(128 * 9, 256, bias=False), nn.BatchNorm1d(256), nn.ReLU(inplace=True),
            nn.Dropout(dropout[3]), nn.Linear(256, 10),
        ]
    else:
        raise SystemExit(f"unknown model architecture {kind!r} (edge, edge-1.1 or cloud)")
    return nn.Sequential(*layers)


def build_ensemble(members):
    """One module whose output averages the members' log-probabilities (a geometric mean of
    their probabilities), so the exported graph still emits logits for temperature scaling."""
    import torch
    import torch.nn as nn

    class Ensemble(nn.Module):
        def __init__(self):
            super().__init__()
            self.members = nn.ModuleList(members)

        def forward(self, x):
            return torch.stack([m(x).log_softmax(1) for m in self.members]).mean(0)

    return Ensemble() if len(members) > 1 else members[0]


def count_flops(model) -> tuple[int, int]:
    """(FLOPs = 2 x multiply-accumulates of conv/linear layers for one image, parameter count)."""
    import torch
    import torch.nn as nn

    macs = 0

    def hook(mod, inp, out):
        nonlocal macs
        if isinstance(mod, nn.Conv2d):
            macs += out.numel() * (mod.in_channels // mod.groups) * mod.kernel_size[0] * mod.kernel_size[1]
        elif isinstance(mod, nn.Linear):
            macs += mod.in_features * mod.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 1, 28, 28))
    for h in handles:
        h.remove()
    return 2 * macs, sum(p.numel() for p in model.parameters())


def normalise(images_u8: np.ndarray) -> np.ndarray:
    return ((images_u8.astype(np.float32) / 255.0 - MEAN) / STD)[:, None, :, :]


def _augment(x, recipe: Recipe, gen):
    """Random translation (pad + crop), horizontal flip and random erasing, on a whole batch."""
    import torch
    import torch.nn.functional as F

    n = x.shape[0]
    p = recipe.crop_pad
    if p:
        xp = F.pad(x, (p, p, p, p), value=float(-MEAN / STD))
        oy = torch.randint(0, 2 * p + 1, (n,), generator=gen)
        ox = torch.randint(0, 2 * p + 1, (n,), generator=gen)
        ar = torch.arange(28)
        iy = (oy[:, None] + ar)[:, :, None]
        ix = (ox[:, None] + ar)[:, None, :]
        x = xp[torch.arange(n)[:, None, None], 0, iy, ix][:, None]
    if recipe.hflip:
        flip = torch.rand(n, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    if recipe.erase_p:
        # Cutout-style erasing of a random 8..14 px square with the background value.
        do = torch.rand(n, generator=gen) < recipe.erase_p
        s = torch.randint(8, 15, (n,), generator=gen)
        cy = torch.randint(0, 28, (n,), generator=gen)
        cx = torch.randint(0, 28, (n,), generator=gen)
        ar = torch.arange(28)
        my = ((ar[None] >= (cy - s // 2)[:, None]) & (ar[None] < (cy + s // 2)[:, None]))[:, :, None]
        mx = ((ar[None] >= (cx - s // 2)[:, None]) & (ar[None] < (cx + s // 2)[:, None]))[:, None, :]
        mask = (my & mx & do[:, None, None])[:, None]
        x = x.masked_fill(mask, float(-MEAN / STD))
    return x


def train_torch(recipe: Recipe, train: ds.Split, log=print):
    import torch
    import torch.nn as nn

    torch.manual_seed(recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed)
    model = build_model(recipe.arch or recipe.kind, recipe.dropout)
    fmt = torch.channels_last if recipe.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    x_all = torch.from_numpy(normalise(train.images))
    y_all = torch.from_numpy(train.labels)
    steps_per_epoch = (len(train) + recipe.batch_size - 1) // recipe.batch_size
    opt = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=0.9, nesterov=True, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=recipe.lr, total_steps=recipe.epochs * steps_per_epoch, pct_start=0.2
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    for epoch in range(recipe.epochs):
        model.train()
        t0 = time.perf_counter()
        perm = torch.randperm(len(train), generator=gen)
        total, correct, loss_sum = 0, 0, 0.0
        for i in range(steps_per_epoch):
            idx = perm[i * recipe.batch_size : (i + 1) * recipe.batch_size]
            xb, yb = _augment(x_all[idx], recipe, gen).contiguous(memory_format=fmt), y_all[idx]
            out = model(xb)
            loss = loss_fn(out, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
            correct += int((out.argmax(1) == yb).sum())
            total += len(idx)
        log(f"[{recipe.kind}] epoch {epoch + 1}/{recipe.epochs} loss {loss_sum / total:.4f} "
            f"train-acc {correct / total:.4f} ({time.perf_counter() - t0:.0f}s)")
    model.eval()
    return model.to(memory_format=torch.contiguous_format)


def export_onnx(model, path: Path) -> None:
    import torch

    dummy = torch.zeros(1, 1, 28, 28)
    kwargs = dict(
        input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17,
    )
    try:
        torch.onnx.export(model, (dummy,), str(path), dynamo=False, **kwargs)
    except TypeError:  # very old torch without the dynamo switch
        torch.onnx.export(model, (dummy,), str(path), **kwargs)


def onnx_logits(path: Path, images_u8: np.ndarray, batch: int = 1000) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = normalise(images_u8)
    return np.concatenate([sess.run(None, {"input": x[i : i + batch]})[0] for i in range(0, len(x), batch)])


# Recorded in the INT8 manifest's recipe; ``quantize_int8`` produces exactly this.
QUANTIZATION = {
    "method": "onnxruntime quantize_static", "format": "QOperator", "per_channel": True,
    "activation_type": "QUInt8", "weight_type": "QInt8", "reduce_range": True,
    "calibration": "MinMax over the first 1000 images of the shipped validation split",
}


def quantize_int8(fp32_path: Path, int8_path: Path, calib_images: np.ndarray | None,
                  *, model_input: np.ndarray | None = None, input_name: str = "input") -> None:
    """Static INT8 quantization (see ``QUANTIZATION``): per-channel 7-bit weights (``reduce_range``),
    UINT8 activations calibrated on held-out images.

    reduce_range: x86 CPUs without VNNI (AVX2, AVX-512F) compute U8S8 dot products with
    vpmaddubsw, which adds pairs of u8*s8 products into int16 and saturates; VNNI accumulates in
    int32 and does not. With weights in [-64, 64], 2 * 255 * 64 = 32640 fits in int16, so every CPU
    computes the same exact result. Full 8-bit weights (model 1.0.0) scored 91.60 % without saturation
    (the Intel machine it was made on) but 89.73 % on an AVX2-only AMD EPYC; S8S8 QDQ saturated the
    same way there, QOperator S8S8 ran ~4x slower, and QDQ files exceed 1/3 of the FP32 twin.

    QOperator format (QLinearConv/QGemm) rather than QDQ: for a model this small the QDQ node
    pairs cost more file size than the weights themselves, and the INT8 file must stay <= 1/3 of
    its FP32 twin. Shape-inference annotations added by the pre-processing are stripped too.

    ``model_input``: calibration batches already preprocessed for another model (``hybrid-router
    model quantize`` passes a user's images through their manifest), fed to ``input_name``;
    without it ``calib_images`` are Fashion-MNIST pixels normalised here.
    """
    import onnx

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self, x: np.ndarray, batch: int = 64):
            self._it = iter([{input_name: x[i : i + batch]} for i in range(0, len(x), batch)])

        def get_next(self):
            return next(self._it, None)

    pre = int8_path.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32_path), str(pre))
    try:
        quantize_static(
            str(pre), str(int8_path), Reader(normalise(calib_images) if model_input is None else model_input),
            quant_format=QuantFormat.QOperator, per_channel=True, reduce_range=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        )
        model = onnx.load(str(int8_path))
        del model.graph.value_info[:]
        onnx.save(model, str(int8_path))
    finally:
        pre.unlink(missing_ok=True)


def _metrics(logits: np.ndarray, labels: np.ndarray, temperature: float) -> dict:
    probs = softmax(logits, temperature)
    return {
        "accuracy": round(float((probs.argmax(1) == labels).mean()), 5),
        "ece": round(expected_calibration_error(probs, labels), 5),
        "ece_uncalibrated": round(expected_calibration_error(softmax(logits), labels), 5),
        "nll": round(float(-np.log(probs[np.arange(len(labels)), labels] + 1e-12).mean()), 5),
    }


def member_recipe(kind: str, index: int, *, seed: int = 0, epochs: int | None = None,
                  train_limit: int | None = None) -> Recipe:
    """``kind``: a key of ``RECIPES`` (a model kind or a named recipe such as ``edge-1.1``)."""
    base = RECIPES[kind]
    return Recipe(**{**asdict(base), **MEMBERS[kind][index], "seed": seed + index,
                     "epochs": epochs or base.epochs, "train_limit": train_limit})


def weights_path(out: Path, kind: str, index: int) -> Path:
    return out / (f"{kind}.pt" if len(MEMBERS[kind]) == 1 else f"{kind}-m{index}.pt")


def run(kind: str, *, data_dir=None, epochs=None, seed=0, out=None, train_limit=None, eval_limit=None, version=None,
        members=None, log=None, recipe: str | None = None) -> Manifest | None:
    """Train the members listed in ``members`` (default: all), each saved as torch weights in ``out``
    (git-ignored; fine-tuning needs them), then -- once every member's weights are there -- export,
    quantize and package. Training members in separate processes (``--member I``) and packaging
    afterwards (``--package``) gives the same artifact as one sequential run.

    ``recipe``: a named recipe of that kind (``edge-1.1``) instead of the kind's own; it has its own
    default output directory and manifest version."""
    import functools

    import torch

    log = log or functools.partial(print, flush=True)
    name = recipe or kind
    if name not in RECIPES or RECIPES[name].kind != kind:
        choices = ", ".join(k for k, r in RECIPES.items() if r.kind == kind)
        raise SystemExit(f"unknown {kind} recipe {name!r}: choose one of {choices}")
    out = Path(out or DEFAULT_OUT[name])
    out.mkdir(parents=True, exist_ok=True)
    n = len(MEMBERS[name])
    todo = range(n) if members is None else members
    for i in todo:
        if not 0 <= i < n:
            raise SystemExit(f"{kind} has members 0..{n - 1}, not {i}")
    train = ds.load_train(data_dir).head(train_limit) if todo else None
    for i in todo:
        member = member_recipe(name, i, seed=seed, epochs=epochs, train_limit=train_limit)
        t0 = time.perf_counter()
        model = train_torch(member, train, log=log)
        info = {**asdict(member), "recipe_name": name, "train_images": len(train),
                "train_seconds": round(time.perf_counter() - t0), "torch": str(torch.__version__),
                "torch_threads": torch.get_num_threads(), "optimizer": "SGD nesterov + OneCycle"}
        torch.save({"recipe": info, "state_dict": model.state_dict()}, weights_path(out, kind, i))

    missing = [str(weights_path(out, kind, i)) for i in range(n) if not weights_path(out, kind, i).exists()]
    if missing:
        log(f"[{kind}] not packaged yet: waiting for {', '.join(missing)}")
        return None
    # eval_limit: smoke runs measure on the first N validation/test images only.
    val, test = ds.load_validation().head(eval_limit), ds.load_test().head(eval_limit)
    saved = [torch.load(weights_path(out, kind, i), weights_only=True) for i in range(n)]
    recipes, models = [ck["recipe"] for ck in saved], []
    for ck in saved:
        model = build_model(ck["recipe"].get("arch") or kind, tuple(ck["recipe"]["dropout"]))
        model.load_state_dict(ck["state_dict"])
        models.append(model.eval())
    model = build_ensemble(models)
    flops, params = count_flops(model)

    fp32 = out / f"{kind}-fp32.onnx"
    export_onnx(model, fp32)
    tta = RECIPES[name].flip_tta  # a property of the packaged graph, not of its members
    if tta:
        add_flip_tta(fp32, fp32)
        flops *= 2
    files = {"fp32": fp32}
    if kind == "edge":
        files["int8"] = out / f"{kind}-int8.onnx"
        # Calibration images: the first 1000 of the held-out validation split (labels unused).
        quantize_int8(fp32, files["int8"], val.images[:1000])

    version = version or RECIPE_VERSION.get(name) or time.strftime("%Y%m%d") + f"-s{seed}"
    recipe_info = {**recipes[0], "flip_tta": tta}
    if tta:
        recipe_info["tta"] = "hflip"
    if n > 1:
        members_info = []
        for i, (member, r) in enumerate(zip(models, recipes)):  # each member alone: what the ensemble adds
            acc = {"val_accuracy": _torch_accuracy(member, val), "test_accuracy": _torch_accuracy(member, test)}
            log(f"[{kind}] member {i}: val {acc['val_accuracy']:.4f} test {acc['test_accuracy']:.4f}")
            members_info.append({**r, **acc})
        recipe_info.update(train_seconds=sum(r["train_seconds"] for r in recipes), members=members_info,
                           ensemble="mean of member log-probabilities")
    manifests = {
        precision: package(kind, path, val, test, version=version, flops=flops, params=params,
                           recipe={**recipe_info, "quantization": QUANTIZATION} if precision == "int8" else recipe_info,
                           twin=fp32.name if precision == "int8" else None, log=log)
        for precision, path in files.items()
    }
    if name in RECIPE_CALIBRATION and "int8" in manifests:
        # A release carries its routing calibration (edge_model/manifest.py ``calibration``).
        from edge_model.manifest import Calibration
        from router_tools.release import calibrate_on_validation

        path = files["int8"].with_suffix(".json")
        cal = calibrate_on_validation(path, target_escalation=RECIPE_CALIBRATION[name])
        manifests["int8"] = manifests["int8"].model_copy(update={"calibration": Calibration(**cal)})
        manifests["int8"].save(path)
        log(f"[{kind}/int8] calibration {json.dumps(cal)}")
    return manifests.get("int8") or manifests["fp32"]


def _torch_accuracy(model, split: ds.Split) -> float:
    import torch

    with torch.no_grad():
        logits = torch.cat([model(torch.from_numpy(normalise(split.images[i : i + 1000])))
                            for i in range(0, len(split), 1000)])
    return round(float((logits.argmax(1).numpy() == split.labels).mean()), 5)


def package(kind: str, path: Path, val: ds.Split, test: ds.Split, *, version: str, flops: int, params: int,
            recipe: dict, twin: str | None = None, log=print) -> Manifest:
    """Fit the temperature on ``val``, measure on ``test`` and write the manifest next to ``path``."""
    precision = "int8" if path.stem.endswith("int8") else "fp32"
    temp = fit_temperature(onnx_logits(path, val.images), val.labels)
    test_logits = onnx_logits(path, test.images)
    metrics = {"test": _metrics(test_logits, test.labels, temp), "file_bytes": path.stat().st_size}
    m = Manifest(
        name=f"fashion-mnist-{kind}", version=version, file=path.name, sha256=sha256_file(path),
        precision=precision, labels=list(ds.LABELS),
        input=InputSpec(name="input", shape=[-1, 1, 28, 28], mean=MEAN, std=STD, background="dark"),  # invert: auto
        output_name="logits", temperature=round(temp, 5), flops=flops, params=params,
        metrics=metrics, recipe=recipe, twin=twin,
    )
    m.save(path.with_suffix(".json"))
    log(f"[{kind}/{precision}] test {json.dumps(metrics)} T={temp:.3f}")
    return m


def add_flip_tta(src: Path, dst: Path) -> None:
    """Rewrite an exported classifier so that it averages the logits of each image and its mirror
    image (horizontal-flip test-time augmentation, matching the flips seen in training).

    input [N,1,H,W] -> Concat(input, Slice(input, W reversed)) [2N,...] -> original graph
    -> logits [2N,C] -> Reshape [2,N,C] -> ReduceMean over the first axis -> logits [N,C].
    One batched ONNX Runtime call, twice the FLOPs; the graph keeps its dynamic batch dimension.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    g = model.graph
    inp, out = g.input[0].name, g.output[0].name
    # Fresh names, so that the rewrite also applies to a graph that was rewritten before.
    taken = {t.name for t in g.initializer} | {o for n in g.node for o in n.output}
    p = next(f"tta{i}_" for i in range(1000) if not any(name.startswith(f"tta{i}_") for name in taken))
    for node in g.node:
        node.input[:] = [p + "x2" if n == inp else n for n in node.input]
        node.output[:] = [p + "logits2" if n == out else n for n in node.output]
    consts = {
        p + "starts": np.array([-1], np.int64), p + "ends": np.array([np.iinfo(np.int64).min], np.int64),
        p + "axes": np.array([3], np.int64), p + "steps": np.array([-1], np.int64),
        p + "shape": np.array([2, -1, g.output[0].type.tensor_type.shape.dim[1].dim_value or 10], np.int64),
    }
    g.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items())
    pre = [
        helper.make_node("Slice", [inp, p + "starts", p + "ends", p + "axes", p + "steps"], [p + "flip"]),
        helper.make_node("Concat", [inp, p + "flip"], [p + "x2"], axis=0),
    ]
    post = [
        helper.make_node("Reshape", [p + "logits2", p + "shape"], [p + "pairs"]),
        helper.make_node("ReduceMean", [p + "pairs"], [out], axes=[0], keepdims=0),
    ]
    nodes = pre + list(g.node) + post
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))


def apply_flip_tta(manifest_path: Path, log=print) -> Manifest:
    """Turn a shipped model into its flip-TTA version in place and re-package it (temperature,
    test metrics, manifest). Used for the cloud model, whose latency is not on the hot path."""
    old = Manifest.load(manifest_path)
    if old.recipe.get("tta") == "hflip":
        raise SystemExit(f"{manifest_path}: already uses flip TTA")
    path = manifest_path.parent / old.file
    add_flip_tta(path, path)
    kind = old.name.rsplit("-", 1)[-1]
    return package(kind, path, ds.load_validation(), ds.load_test(), version=old.version, flops=2 * old.flops,
                   params=old.params, recipe={**old.recipe, "tta": "hflip"}, twin=old.twin, log=log)


def main(argv: list[str] | None = None) -> int:
    from router_tools.train_cli import add_arguments, run as cli_run

    p = argparse.ArgumentParser(prog="python -m router_tools.train", description=__doc__.splitlines()[0])
    add_arguments(p)
    return cli_run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
