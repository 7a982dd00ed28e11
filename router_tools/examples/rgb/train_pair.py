"""Train the RGB worked example's model pair in torch and export both as plain FP32 ONNX.

    .venv/bin/python router_tools/examples/rgb/train_pair.py            # needs torch (the tools' train extra)

writes ``edge.onnx`` (a tiny CNN, 4 k parameters), ``cloud.onnx`` (a 40x larger CNN ending in
Softmax, as many exported models do), ``labels.txt`` and ``preprocessing.json`` next to this file -- the way a user
arrives: two ONNX files and a labels file, no manifest. The pixel statistics it normalises with
are printed and written to ``preprocessing.json``, for ``hybrid-router model import --mean/--std``.

Both take ``input`` float32 ``[N, 3, 32, 32]`` RGB, ``(pixel/255 - MEAN) / STD`` per channel, and
are trained on the ``train`` split of :mod:`signs` (seeded; 16 000 images made in memory).
Everything is seeded. On 2 cores shared with other jobs the edge took 1 minute and the cloud 15
(``--only edge`` and ``--only cloud`` in two processes at once; one torch thread each).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import signs  # noqa: E402



def conv(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def edge_net(n: int) -> nn.Module:
    return nn.Sequential(*conv(3, 8), nn.MaxPool2d(2), *conv(8, 16), nn.MaxPool2d(2), *conv(16, 16),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, n))


def cloud_net(n: int) -> nn.Module:
    return nn.Sequential(*conv(3, 32), nn.MaxPool2d(2), *conv(32, 48), *conv(48, 48), nn.MaxPool2d(2),
                         *conv(48, 96), *conv(96, 96), nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Dropout(0.2), nn.Linear(96, n))


class WithSoftmax(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        return torch.softmax(self.net(x), dim=1)


def pixel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of ``pixel / 255`` over the train split, rounded to 3 decimals:
    what ``hybrid-router model import --mean/--std`` is given."""
    px = images.reshape(-1, 3) / 255.0
    return np.round(px.mean(0), 3).tolist(), np.round(px.std(0), 3).tolist()


def to_input(images: np.ndarray, mean, std) -> torch.Tensor:
    x = images.astype(np.float32) / np.float32(255.0)
    x = (x - np.array(mean, np.float32)) / np.array(std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def train(net: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = epochs * ((len(x) + 127) // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.25)
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        net.train()
        t0, total = time.perf_counter(), 0.0
        for idx in torch.randperm(len(x), generator=g).split(128):
            xb = x[idx]
            flip = torch.rand(len(xb), generator=g) < 0.5  # every symbol is left-right symmetric
            xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
            opt.zero_grad()
            loss = loss_fn(net(xb), y[idx])
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        print(f"  epoch {epoch + 1}/{epochs}: loss {total / len(x):.4f} ({time.perf_counter() - t0:.1f} s)", flush=True)
    return net.eval()


def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((torch.cat([net(b) for b in x.split(500)]).argmax(1) == y).float().mean())


def export(net: nn.Module, path: Path, output: str) -> None:
    torch.onnx.export(net, (torch.zeros(1, 3, signs.SIZE, signs.SIZE),), str(path), dynamo=False,
                      input_names=["input"], output_names=[output], opset_version=17,
                      dynamic_axes={"input": {0: "batch"}, output: {0: "batch"}})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(HERE))
    p.add_argument("--train-count", type=int, default=16000, help="train-split images (default 16000)")
    p.add_argument("--edge-epochs", type=int, default=4)
    p.add_argument("--cloud-epochs", type=int, default=5)
    p.add_argument("--cloud-train-count", type=int, help="the cloud model's share of the train split (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared machine 2 spinning threads ran 10x slower)")
    p.add_argument("--only", choices=["edge", "cloud"], help="train one of the two (run both at once on two cores)")
    p.add_argument("--cache", metavar="NPZ", help="keep the generated images here (made once, then read)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)

    t0 = time.perf_counter()
    cache = Path(args.cache) if args.cache else None
    if cache is not None and cache.is_file():
        with np.load(cache) as z:
            train_images, train_labels, test_images, test_labels = (z[k] for k in ("xtr", "ytr", "xte", "yte"))
    else:
        train_images, train_labels = signs.generate("train", args.train_count)
        test_images, test_labels = signs.generate("test")
        if cache is not None:
            np.savez(cache, xtr=train_images, ytr=train_labels, xte=test_images, yte=test_labels)
    train_images, train_labels = train_images[:args.train_count], train_labels[:args.train_count]
    mean, std = pixel_stats(train_images)
    x, y = to_input(train_images, mean, std), torch.from_numpy(train_labels)
    xt, yt = to_input(test_images, mean, std), torch.from_numpy(test_labels)
    print(f"data: {len(x)} train, {len(xt)} test images ({time.perf_counter() - t0:.1f} s); "
          f"train pixel mean {mean}, std {std}")

    for kind, make, epochs, lr, seed in (("edge", edge_net, args.edge_epochs, 0.1, args.seed),
                                         ("cloud", cloud_net, args.cloud_epochs, 0.05, args.seed + 1)):
        if args.only not in (None, kind):
            continue
        torch.manual_seed(seed)
        net = make(len(signs.LABELS))
        print(f"{kind}: {sum(p.numel() for p in net.parameters()):,} parameters, {epochs} epochs", flush=True)
        n = (args.cloud_train_count or len(x)) if kind == "cloud" else len(x)
        train(net, x[:n], y[:n], epochs, lr, seed)
        print(f"{kind}: test accuracy (torch) {accuracy(net, xt, yt):.2%}", flush=True)
        if kind == "edge":
            export(net, out / "edge.onnx", "logits")
        else:
            export(WithSoftmax(net).eval(), out / "cloud.onnx", "probabilities")
    (out / "labels.txt").write_text("\n".join(signs.LABELS) + "\n")
    # What a user knows about their own models' input, for `model import --mean/--std`.
    (out / "preprocessing.json").write_text(json.dumps({"color": "RGB", "layout": "NCHW", "scale": "1/255",
                                                         "mean": mean, "std": std}) + "\n")
    print(f"wrote {args.only or 'edge and cloud'} ONNX, labels.txt and preprocessing.json to {out} "
          f"({time.perf_counter() - t0:.0f} s in all)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
