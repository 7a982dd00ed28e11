"""``hybrid-router calibrate`` on real models and data: the held-out escalation promise, user
data folders and CSVs (and their errors), policy edits that keep the operator's file intact,
temperature refit, the curve PNG."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from edge_model import EdgeModel
from router_tools.datasets import LABELS, load_test
from router_tools.thresholds import escalation_rate
from router_tools.cli import main
from router_tools.labeled import LabeledDataError, load_labeled, resolve_label
from router.policy import DEFAULT_POLICY_PATH, load_policy
from router_tools.policy_edit import PolicyEditError, edit_policy, set_scalar
from router_tools.scoring import model_probs

# Folder names as users write them: punctuation/case-insensitive names and indices.
FOLDER_NAMES = ["t-shirt_top", "TROUSER", "pullover", "3", "Coat", "sandal", "Shirt", "sneaker", "bag", "ankle boot"]


def calibrate(*argv: str) -> int:
    return main(["calibrate", *argv])


@pytest.fixture(scope="module")
def edge():
    return EdgeModel()


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """60 real test-split images as PNG files in DIR/<label>/ (6 per class)."""
    root = tmp_path_factory.mktemp("labeled")
    test = load_test()
    for c, name in enumerate(FOLDER_NAMES):
        (root / name).mkdir()
        for j, i in enumerate(np.flatnonzero(test.labels == c)[:6]):
            Image.fromarray(test.images[i]).save(root / name / f"{i:05d}.png")
    return root


# ----------------------------------------------------------------------------- the promise


def test_threshold_from_validation_holds_its_escalation_on_the_test_split(tmp_path, edge):
    out = tmp_path / "cal.json"
    assert calibrate("--target-escalation", "0.25", "--json", str(out)) == 0
    result = json.loads(out.read_text())
    assert result["data"] == {"name": "shipped validation split", "n": 5000}
    assert abs(result["escalation"] - 0.25) <= 1 / 5000  # exact on the data it saw (no big ties)
    # Data it did not see, same models: the realised escalation is within +-2 points.
    conf = model_probs(edge, load_test().images).max(axis=1)
    realised = escalation_rate(conf, result["threshold"])
    assert abs(realised - 0.25) <= 0.02, realised


# ----------------------------------------------------------------------------- user data


def test_folder_and_csv_give_the_same_data_and_threshold(tmp_path, image_dir, edge):
    a = load_labeled(image_dir, config=edge.preprocess_config)
    assert len(a) == 60 and sorted(np.bincount(a.labels)) == [6] * 10
    csv_file = tmp_path / "set.csv"
    # relative paths (to the CSV file) and absolute ones; names and indices as labels
    rows = ["path,label"] + [f"{os.path.relpath(p, tmp_path) if i % 2 else p},{LABELS[c] if i % 3 else c}"
                             for i, (p, c) in enumerate(zip(a.paths, a.labels))]
    csv_file.write_text("\n".join(rows) + "\n")
    b = load_labeled(csv_file, config=edge.preprocess_config)
    np.testing.assert_array_equal(a.pixels, b.pixels)
    np.testing.assert_array_equal(a.labels, b.labels)

    outs = []
    for data in (image_dir, csv_file):
        out = tmp_path / f"{Path(data).name}.json"
        assert calibrate("--data", str(data), "--target-escalation", "0.2", "--json", str(out)) == 0
        outs.append(json.loads(out.read_text()))
    assert outs[0]["threshold"] == outs[1]["threshold"]
    assert outs[0]["data"]["n"] == 60
    # the chosen threshold escalates what it says on this data, computed independently
    conf = model_probs(edge, a.pixels).max(axis=1)
    assert escalation_rate(conf, outs[0]["threshold"]) == pytest.approx(outs[0]["escalation"])
    assert abs(outs[0]["escalation"] - 0.2) <= 1 / 60 + 1e-9


def test_labels_resolve_by_name_or_index():
    assert resolve_label("t-shirt_top", LABELS) == 0
    assert resolve_label("Ankle Boot", LABELS) == 9
    assert resolve_label("7", LABELS) == 7
    for bad in ("12", "boot", ""):
        with pytest.raises(ValueError):
            resolve_label(bad, LABELS)


def test_bad_data_gets_a_clear_error_naming_the_path(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert calibrate("--data", str(missing), "--target-escalation", "0.2") == 2
    assert f"{missing}: no such folder or CSV file" in capsys.readouterr().err

    unknown = tmp_path / "unknown"
    (unknown / "hat").mkdir(parents=True)
    with pytest.raises(LabeledDataError, match=r"hat: folder name is not a class: unknown label 'hat'"):
        load_labeled(unknown)

    empty = tmp_path / "empty"
    (empty / "bag").mkdir(parents=True)
    with pytest.raises(LabeledDataError, match="no images"):
        load_labeled(empty)
    with pytest.raises(LabeledDataError, match="no label folders"):
        load_labeled(tmp_path / "empty" / "bag")

    broken = tmp_path / "broken"
    (broken / "bag").mkdir(parents=True)
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(broken / "bag" / "ok.png")
    (broken / "bag" / "bad.png").write_bytes(b"not a png at all")
    (broken / "bag" / "cut.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 20)
    assert calibrate("--data", str(broken), "--target-escalation", "0.2") == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "2 of 3 images cannot be read" in err
    assert str(broken / "bag" / "bad.png") in err and str(broken / "bag" / "cut.jpg") in err

    csv_file = tmp_path / "bad.csv"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "a.png")
    csv_file.write_text("a.png,bag\na.png,hat\n")
    with pytest.raises(LabeledDataError, match=r"bad\.csv:2: unknown label 'hat'"):
        load_labeled(csv_file)
    csv_file.write_text("a.png,bag\nmissing.png,0\n")
    with pytest.raises(LabeledDataError, match=r"bad\.csv:2: image file .*missing\.png not found"):
        load_labeled(csv_file)
    csv_file.write_text("just-one-column\n")
    with pytest.raises(LabeledDataError, match=r"bad\.csv:1: expected 'path,label'"):
        load_labeled(csv_file)
    (tmp_path / "x.txt").write_text("a.png,bag\n")
    with pytest.raises(LabeledDataError, match="expected a folder"):
        load_labeled(tmp_path / "x.txt")


# ----------------------------------------------------------------------------- policy edits


def test_write_changes_only_the_threshold_line(tmp_path, image_dir, capsys):
    policy = tmp_path / "policy.yaml"
    original = DEFAULT_POLICY_PATH.read_text()
    policy.write_text(original)
    out = tmp_path / "r.json"
    # --print-patch alone writes nothing
    assert calibrate("--data", str(image_dir), "--target-escalation", "0.3", "--config", str(policy),
                     "--print-patch", "--json", str(out)) == 0
    patch = capsys.readouterr().out
    t = json.loads(out.read_text())["threshold"]
    assert f"-confidence_threshold: {load_policy(policy).confidence_threshold!r}" in patch
    assert f"+confidence_threshold: {t!r}" in patch
    assert policy.read_text() == original

    assert calibrate("--data", str(image_dir), "--target-escalation", "0.3", "--write", str(policy)) == 0
    new = policy.read_text()
    changed = [(a, b) for a, b in zip(original.splitlines(), new.splitlines()) if a != b]
    assert len(original.splitlines()) == len(new.splitlines())
    old_comment = next(line for line in original.splitlines() if line.startswith("# Chosen by"))
    # the value and the comment saying what chose it, nothing else
    assert changed == [(old_comment, f"# Chosen by `hybrid-router calibrate --target-escalation 0.3 --data {image_dir}` "
                                     f"(n=60, edge model {EdgeModel().version}): 30.0% escalated, "
                                     f"accuracy {json.loads(out.read_text())['accuracy']:.2%}."),
                       (f"confidence_threshold: {load_policy(DEFAULT_POLICY_PATH).confidence_threshold!r}",
                        f"confidence_threshold: {t!r}")]
    assert load_policy(policy).confidence_threshold == t


def test_provenance_comment_is_replaced_or_added_above_the_key():
    from router_tools.policy_edit import set_provenance

    text = "# about it\n# chosen by hand\n# more\nconfidence_threshold: 0.8  # inline stays\nmode: edge_only\n"
    out = edit_policy(text, {("confidence_threshold",): 0.5}, notes={("confidence_threshold",): "Chosen by calibrate"})
    assert out == "# about it\n# Chosen by calibrate\n# more\nconfidence_threshold: 0.5  # inline stays\nmode: edge_only\n"
    # no such comment: one is added right above the key (also for a key that was absent, and nested ones)
    out = edit_policy("mode: edge_only\n# other\nconfidence_threshold: 0.8\n", {("confidence_threshold",): 0.5},
                      notes={("confidence_threshold",): "Chosen by x"})
    assert out == "mode: edge_only\n# other\n# Chosen by x\nconfidence_threshold: 0.5\n"
    out = edit_policy("mode: edge_only\n", {("confidence_threshold",): 0.5}, notes={("confidence_threshold",): "Chosen by y"})
    assert out == "mode: edge_only\n# Chosen by y\nconfidence_threshold: 0.5\n"
    assert set_provenance("edge:\n  # Chosen by old\n  manifest: m\n", 2, "Chosen by\nnew") == \
        "edge:\n  # Chosen by new\n  manifest: m\n"
    # a comment that is separated by a value line belongs to that line, not to the key
    assert set_provenance("# chosen by a\nmode: edge_only\nconfidence_threshold: 1\n", 2, "Chosen by b") == \
        "# chosen by a\nmode: edge_only\n# Chosen by b\nconfidence_threshold: 1\n"


def test_policy_text_edits():
    text = "# top\nmode: prefer_edge\nconfidence_threshold: 0.8   # keep me\nedge:\n  # inner\n  manifest: null  # c\n  intra_op_threads: 1\ncloud:\n  endpoints: []\n"
    out = set_scalar(text, ("confidence_threshold",), "0.55")
    assert out == text.replace("0.8   # keep me", "0.55   # keep me")
    out = set_scalar(text, ("edge", "manifest"), '"/x/e.json"')
    assert '  manifest: "/x/e.json"  # c\n' in out and out.count("manifest") == 1
    # absent keys are added in the right block
    out = set_scalar("mode: edge_only\n", ("confidence_threshold",), "0.5")
    assert yaml.safe_load(out) == {"mode": "edge_only", "confidence_threshold": 0.5}
    out = set_scalar("edge:\n  intra_op_threads: 2\nmode: edge_only\n", ("edge", "manifest"), '"m.json"')
    assert yaml.safe_load(out) == {"edge": {"intra_op_threads": 2, "manifest": "m.json"}, "mode": "edge_only"}
    out = set_scalar("mode: edge_only\n", ("edge", "manifest"), '"m.json"')
    assert yaml.safe_load(out) == {"mode": "edge_only", "edge": {"manifest": "m.json"}}
    # a nested key of the same name elsewhere is not touched
    out = set_scalar("cloud:\n  confidence_threshold: 3\nconfidence_threshold: 0.1\n", ("confidence_threshold",), "0.2")
    assert yaml.safe_load(out) == {"cloud": {"confidence_threshold": 3}, "confidence_threshold": 0.2}
    with pytest.raises(PolicyEditError, match="2 times"):
        set_scalar("confidence_threshold: 1\nconfidence_threshold: 2\n", ("confidence_threshold",), "0.2")
    with pytest.raises(PolicyEditError, match="inline"):
        set_scalar("edge: {manifest: null}\n", ("edge", "manifest"), '"m"')
    # the result is validated before anything is written
    with pytest.raises(Exception, match="confidence_threshold"):
        edit_policy("confidence_threshold: 0.8\n", {("confidence_threshold",): 1.5})


def test_refit_temperature_writes_an_edge_model_the_router_loads(tmp_path, image_dir, capsys):
    policy = tmp_path / "policy.yaml"
    policy.write_text(DEFAULT_POLICY_PATH.read_text())
    args = ["--data", str(image_dir), "--target-escalation", "0.25", "--refit-temperature", "--write", str(policy)]
    assert calibrate(*args) == 2
    assert "--edge-out" in capsys.readouterr().err
    out = tmp_path / "r.json"
    png = tmp_path / "curve.png"
    assert calibrate(*args, "--edge-out", str(tmp_path / "edge"), "--json", str(out), "--plot", str(png)) == 0
    result = json.loads(out.read_text())
    t_new = result["edge"]["temperature_refit"]
    assert t_new != result["edge"]["temperature"]
    p = load_policy(policy)
    assert p.confidence_threshold == result["threshold"]
    edge = EdgeModel(p.edge.manifest)
    assert edge.temperature == pytest.approx(t_new)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
