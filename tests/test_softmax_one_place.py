"""One formula, one place: every site that turns logits into calibrated probabilities calls
``edge_model.calibration.calibrated_softmax``, so the edge, the service, the Triton adapter, the
router's v2 client and the tools agree bit for bit."""

import re
from pathlib import Path

import numpy as np
import pytest

from edge_model.calibration import calibrated_softmax, softmax
from edge_model.runtime import DEFAULT_EDGE_MANIFEST, OnnxClassifier
from router_tools.thresholds import apply_temperature

ROOT = Path(__file__).resolve().parent.parent
SITES = ["edge_model/runtime.py", "cloud_service/dataplane.py", "cloud_service/triton.py", "router/cloud.py",
         "router_tools/thresholds.py", "router_tools/train.py"]
# The shape of a hand-written softmax: a max subtracted, then an exponential within a few lines.
_MAX_SHIFT = re.compile(r"(-=|-)\s*\w+\.max\(")
_EXP = re.compile(r"\bnp\.exp\(")


@pytest.mark.parametrize("site", SITES)
def test_no_site_writes_its_own_softmax(site):
    lines = (ROOT / site).read_text().splitlines()
    for i, line in enumerate(lines):
        if _MAX_SHIFT.search(line) and any(_EXP.search(nxt) for nxt in lines[i:i + 4]):
            pytest.fail(f"{site}:{i + 1} writes its own softmax; call edge_model.calibration.calibrated_softmax")


def _logits(n: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((n, 10)) * 6).astype(np.float32)


@pytest.mark.parametrize("rows", [1, 2, 64])
def test_sites_agree_bit_for_bit(rows):
    logits = _logits(rows)
    t = 0.8731
    ref = calibrated_softmax(logits, t)
    assert ref.dtype == np.float32
    np.testing.assert_array_equal(apply_temperature(logits, t), ref)
    np.testing.assert_array_equal(softmax(logits, t), ref)
    np.testing.assert_array_equal(calibrated_softmax(logits.copy(), t, inplace=True), ref)
    assert np.allclose(ref.sum(axis=1), 1, atol=1e-6)


def test_edge_runtime_is_the_same_formula():
    clf = OnnxClassifier(DEFAULT_EDGE_MANIFEST)
    x = np.random.default_rng(1).standard_normal((5, *clf.session.get_inputs()[0].shape[1:])).astype(np.float32)
    for batch in (x[:1], x):
        np.testing.assert_array_equal(clf.predict_proba(batch), calibrated_softmax(clf.logits(batch), clf.temperature))


def test_inplace_never_touches_a_foreign_dtype():
    logits = _logits(3).astype(np.float64)
    before = logits.copy()
    calibrated_softmax(logits, 2.0, inplace=True)
    np.testing.assert_array_equal(logits, before)
