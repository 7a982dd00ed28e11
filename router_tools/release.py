"""The operator's side of the edge-model release channel: a TUF repository of static files.

Built on python-tuf's metadata API (``tuf.api.metadata``) and securesystemslib's ed25519
``CryptoSigner``: no hand-written cryptography, and the client side (``router.updates``) verifies
with tuf's own ngclient ``Updater``. Layout of ``--repo DIR``::

    DIR/keys/<role>.pem          private ed25519 keys, 0600 in a 0700 folder; never published
    DIR/keys/retired/            keys replaced by ``rotate-key`` (destroy them once devices moved on)
    DIR/public/metadata/         1.root.json .. N.root.json, N.targets.json, N.snapshot.json, timestamp.json
    DIR/public/targets/edge/...  hash-prefixed target files (consistent snapshots)

``DIR/public`` is what any static file server serves; ``DIR/public/metadata/1.root.json`` is the
trust anchor shipped with the app (``updates.root`` in the policy). Publishing writes every new
file first and ``timestamp.json`` last (an atomic rename), so a device reading mid-publish sees
either the old release or the new one.

Targets of one release ``V``: ``edge/V/manifest.json``, ``edge/V/<model file>``, optionally
``edge/V/golden.npz`` (reference inputs ``x`` and expected top-1 ``labels``), and the one channel
file ``edge/channel.json`` listing every release with its publish sequence and rollout share.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from router.errors import RouterError

ROLES = ("root", "targets", "snapshot", "timestamp")
CHANNEL_TARGET = "edge/channel.json"
# Default lifetimes: the timestamp is re-signed often (`release refresh`); a device that sees it
# expired refuses the channel (freeze protection) and keeps its current model.
EXPIRY_DAYS = {"root": 365, "targets": 365, "snapshot": 30, "timestamp": 7}


class ReleaseError(RouterError):
    """An operator mistake or an unusable repository; the message says what to do (one line)."""


def _need_tuf():
    try:
        import securesystemslib  # noqa: F401
        import tuf.api.metadata  # noqa: F401
    except ImportError:
        raise ReleaseError("publishing needs the release extra: pip install 'hybrid-edge-router-tools[release]'") from None


def _expiry(role: str, days: float | None = None) -> datetime:
    d = EXPIRY_DAYS[role] if days is None else days
    return (datetime.now(timezone.utc) + timedelta(days=d)).replace(microsecond=0)


@dataclass
class Repo:
    root_dir: Path
    keys_dir: Path

    @classmethod
    def at(cls, repo: str | os.PathLike, keys: str | os.PathLike | None = None) -> "Repo":
        root = Path(repo)
        return cls(root, Path(keys) if keys else root / "keys")

    @property
    def public(self) -> Path:
        return self.root_dir / "public"

    @property
    def metadata_dir(self) -> Path:
        return self.public / "metadata"

    @property
    def targets_dir(self) -> Path:
        return self.public / "targets"

    @property
    def trust_anchor(self) -> Path:
        return self.metadata_dir / "1.root.json"

    # ------------------------------------------------------------------ keys

    def signer(self, role: str):
        from cryptography.hazmat.primitives.serialization import load_pem_private_key
        from securesystemslib.signer import CryptoSigner

        path = self.keys_dir / f"{role}.pem"
        try:
            return CryptoSigner(load_pem_private_key(path.read_bytes(), password=None))
        except FileNotFoundError:
            raise ReleaseError(f"{path}: {role} key not found; run `hybrid-router release keys --repo {self.root_dir}` "
                               "or pass --keys to the folder holding the keys") from None

    def _write_key(self, role: str, signer) -> None:
        self.keys_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.keys_dir, 0o700)
        path = self.keys_dir / f"{role}.pem"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(signer.private_bytes)
        os.chmod(path, 0o600)  # O_CREAT's mode is masked by umask; be explicit

    # ------------------------------------------------------------------ metadata files

    def _write(self, name: str, md) -> Path:
        from tuf.api.serialization.json import JSONSerializer

        self.metadata_dir.mkdir(parents=True, exist_ok=True)
        path = self.metadata_dir / name
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(md.to_bytes(JSONSerializer(compact=False)))
        os.replace(tmp, path)  # readers see the whole old file or the whole new one
        return path

    def _latest(self, role: str):
        from tuf.api.metadata import Metadata

        if role == "timestamp":
            path = self.metadata_dir / "timestamp.json"
        else:
            versions = [int(p.name.split(".")[0]) for p in self.metadata_dir.glob(f"*.{role}.json")
                        if p.name.split(".")[0].isdigit()]
            if not versions:
                raise ReleaseError(f"{self.metadata_dir}: no {role} metadata; run `hybrid-router release keys` first")
            path = self.metadata_dir / f"{max(versions)}.{role}.json"
        try:
            return Metadata.from_file(str(path))
        except FileNotFoundError:
            raise ReleaseError(f"{path}: not found; run `hybrid-router release keys` first") from None

    def _sign_write(self, role: str, md, *signers) -> None:
        md.signatures.clear()
        for s in signers or (self.signer(role),):
            md.sign(s, append=True)
        if role == "timestamp":
            self._write("timestamp.json", md)
        else:
            self._write(f"{md.signed.version}.{role}.json", md)
            if role == "root":
                self._write("root.json", md)

    def _snapshot_timestamp(self, targets_version: int, snapshot_days: float | None = None,
                            timestamp_days: float | None = None) -> tuple[int, int]:
        from tuf.api.metadata import MetaFile

        snap = self._latest("snapshot")
        snap.signed.version += 1
        snap.signed.meta["targets.json"] = MetaFile(version=targets_version)
        snap.signed.expires = _expiry("snapshot", snapshot_days)
        self._sign_write("snapshot", snap)
        ts = self._latest("timestamp")
        ts.signed.version += 1
        ts.signed.snapshot_meta = MetaFile(version=snap.signed.version)
        ts.signed.expires = _expiry("timestamp", timestamp_days)
        self._sign_write("timestamp", ts)  # last: this rename publishes the new state
        return snap.signed.version, ts.signed.version


# ---------------------------------------------------------------------- commands


def create_keys(repo: Repo, *, force: bool = False) -> dict[str, str]:
    """Generate the four role keys and the first signed metadata. Returns ``{role: keyid}``."""
    _need_tuf()
    from securesystemslib.signer import CryptoSigner
    from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, Targets, Timestamp

    if any((repo.keys_dir / f"{r}.pem").exists() for r in ROLES) and not force:
        raise ReleaseError(f"{repo.keys_dir}: keys already exist; rotate one with `hybrid-router release rotate-key ROLE`")
    if repo.metadata_dir.exists() and any(repo.metadata_dir.iterdir()) and not force:
        raise ReleaseError(f"{repo.metadata_dir}: a repository already exists here; pick an empty --repo")
    signers = {role: CryptoSigner.generate_ed25519() for role in ROLES}
    for role, s in signers.items():
        repo._write_key(role, s)
    root = Root(expires=_expiry("root"), consistent_snapshot=True)
    for role, s in signers.items():
        root.add_key(s.public_key, role)
    repo._sign_write("root", Metadata(root), signers["root"])
    repo._sign_write("targets", Metadata(Targets(expires=_expiry("targets"))), signers["targets"])
    repo._sign_write("snapshot", Metadata(Snapshot(expires=_expiry("snapshot"))), signers["snapshot"])
    repo._sign_write("timestamp", Metadata(Timestamp(expires=_expiry("timestamp"), snapshot_meta=MetaFile(1))),
                     signers["timestamp"])
    repo.targets_dir.mkdir(parents=True, exist_ok=True)
    return {role: s.public_key.keyid for role, s in signers.items()}


def _current_targets(repo: Repo):
    """The latest targets metadata and the channel it publishes (``{}`` before the first release)."""
    targets = repo._latest("targets")
    info = targets.signed.targets.get(CHANNEL_TARGET)
    if info is None:
        return targets, {"format": 1, "releases": {}}
    path = repo.targets_dir / "edge" / f"{info.hashes['sha256']}.channel.json"
    return targets, json.loads(path.read_bytes())


def _add_target(repo: Repo, targets, path: str, data: bytes) -> str:
    from tuf.api.metadata import TargetFile

    tf = TargetFile.from_data(path, data, ["sha256"])
    digest = tf.hashes["sha256"]
    dirname, _, base = path.rpartition("/")
    out = repo.targets_dir / dirname / f"{digest}.{base}"
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists():
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, out)
    targets.signed.targets[path] = tf
    return digest


def golden_from_test_split(manifest_path: Path, samples: int):
    """Reference inputs and the release model's own top-1 answers on the first ``samples`` test images:
    a device whose runtime computes something else with these bytes refuses the release."""
    import numpy as np

    from edge_model.runtime import OnnxClassifier
    from router_tools.datasets import load_test

    model = OnnxClassifier(manifest_path)
    test = load_test()
    x = model.preprocess_batch(list(test.images[:samples]))
    labels = model.predict_proba(x).argmax(axis=1).astype(np.int64)
    return x.astype(np.float32), labels


def calibrate_on_validation(manifest_path: Path, *, target_escalation: float | None = None,
                            threshold: float | None = None) -> dict:
    """The release's ``calibration`` (see edge_model/manifest.py) measured on the shipped validation
    split: the threshold whose escalation share is ``target_escalation`` (the lowest confidence
    that keeps that share under it), or the share a given ``threshold`` escalates."""
    import numpy as np

    from edge_model.runtime import OnnxClassifier
    from router_tools.datasets import load_validation

    if (target_escalation is None) == (threshold is None):
        raise ReleaseError("give one of --target-escalation and --threshold")
    for name, v in (("--target-escalation", target_escalation), ("--threshold", threshold)):
        if v is not None and not 0.0 <= v <= 1.0:
            raise ReleaseError(f"{name} must be within [0, 1]; got {v}")
    model = OnnxClassifier(manifest_path)
    val = load_validation()
    conf = np.sort(model.predict_proba(model.preprocess_batch(list(val.images))).max(axis=1))
    if threshold is None:
        k = min(len(conf) - 1, int(round(target_escalation * len(conf))))
        threshold = float(conf[k]) if k > 0 else 0.0
    share = float((conf < threshold).mean())
    return {"threshold": round(float(threshold), 6), "expected_escalation": round(share, 6), "split": "validation"}


def golden_bytes(x, labels) -> bytes:
    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, x=np.asarray(x, dtype=np.float32), labels=np.asarray(labels, dtype=np.int64))
    return buf.getvalue()


def make_delta(old: bytes, new: bytes) -> bytes:
    """zstd with the old model as a raw-content dictionary (zstd's ``--patch-from``): a device
    holding ``old`` downloads only what changed. The window covers both files (max 128 MiB)."""
    import zstandard as zstd

    d = zstd.ZstdCompressionDict(old, dict_type=zstd.DICT_TYPE_RAWCONTENT)
    params = zstd.ZstdCompressionParameters.from_level(19, window_log=max(20, min(27, (len(old) + len(new)).bit_length())))
    return zstd.ZstdCompressor(dict_data=d, compression_params=params).compress(new)


def publish(repo: Repo, manifest_path: str | os.PathLike, *, rollout: float = 1.0, golden: bytes | None = None,
            golden_min_agreement: float = 0.95, targets_days: float | None = None, snapshot_days: float | None = None,
            timestamp_days: float | None = None, delta_from: tuple[str, ...] = (),
            calibration: dict | None = None) -> dict:
    """Add (or re-stage) the release of ``manifest_path``: a new signed targets version, snapshot
    and timestamp. Re-publishing the same version with the same bytes changes only its rollout
    share (5 % -> 25 % -> 100 %). ``delta_from``: earlier versions to ship a zstd patch from
    (devices holding one download the patch instead of the model). ``calibration``: written into the
    published manifest (threshold and expected escalation travel with the release). Returns the
    release entry."""
    _need_tuf()
    from edge_model.errors import ArtifactError
    from edge_model.manifest import Manifest, read_verified

    if not 0.0 <= rollout <= 1.0:
        raise ReleaseError(f"--rollout must be a share within [0, 1]; got {rollout}")
    if not 0.0 < golden_min_agreement <= 1.0:
        raise ReleaseError(f"golden agreement floor must be within (0, 1]; got {golden_min_agreement}")
    manifest_path = Path(manifest_path)
    try:
        manifest = Manifest.load(manifest_path)
        model = read_verified(manifest_path.parent / manifest.file, manifest.sha256)
        manifest_bytes = manifest_path.read_bytes()
        if calibration is not None:
            raw = json.loads(manifest_bytes)
            raw["calibration"] = dict(calibration)
            manifest = Manifest.model_validate(raw)
            manifest_bytes = (json.dumps(raw, indent=2) + "\n").encode()
    except ArtifactError as exc:
        raise ReleaseError(f"cannot publish: {exc}") from None
    except ValueError as exc:  # pydantic's ValidationError: a bad calibration
        raise ReleaseError(f"cannot publish: calibration {calibration}: {str(exc).splitlines()[0]}") from None
    version = manifest.version
    if "/" in version or version in (".", "..") or not version:
        raise ReleaseError(f"{manifest_path}: version {version!r} cannot name a release folder")
    targets, channel = _current_targets(repo)
    releases = channel["releases"]
    old = releases.get(version)
    if old is not None and old["sha256"] != manifest.sha256:
        raise ReleaseError(f"release {version} is already published with other model bytes; bump the manifest's version")
    base = f"edge/{version}"
    entry = dict(old) if old else {
        "seq": 1 + max((r["seq"] for r in releases.values()), default=0),
        "name": manifest.name,
        "sha256": manifest.sha256,
        "manifest": f"{base}/manifest.json",
        "model": f"{base}/{manifest.file}",
        "golden": None,
        "golden_min_agreement": golden_min_agreement,
        "published": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
    }
    entry["rollout"] = float(rollout)
    if old is None:
        _add_target(repo, targets, entry["manifest"], manifest_bytes)
        _add_target(repo, targets, entry["model"], model)
        if golden is not None:
            entry["golden"] = f"{base}/golden.npz"
            _add_target(repo, targets, entry["golden"], golden)
    for prev in delta_from:
        src = releases.get(prev)
        if src is None or prev == version:
            raise ReleaseError(f"--delta-from {prev}: not an earlier release in this channel; published: {sorted(releases)}")
        prev_file = repo.targets_dir / src["model"].rpartition("/")[0] / f"{src['sha256']}.{src['model'].rpartition('/')[2]}"
        path = f"{base}/{manifest.file}.from-{prev}.zst"
        _add_target(repo, targets, path, make_delta(prev_file.read_bytes(), model))
        entry.setdefault("deltas", {})[prev] = {"path": path, "base_sha256": src["sha256"]}
    releases[version] = entry
    channel["latest"] = max(releases, key=lambda v: releases[v]["seq"])
    _add_target(repo, targets, CHANNEL_TARGET, json.dumps(channel, indent=2, sort_keys=True).encode())
    targets.signed.version += 1
    targets.signed.expires = _expiry("targets", targets_days)
    repo._sign_write("targets", targets)
    repo._snapshot_timestamp(targets.signed.version, snapshot_days, timestamp_days)
    return {"version": version, **entry, "targets_version": targets.signed.version}


def refresh(repo: Repo, *, timestamp_days: float | None = None, snapshot_days: float | None = None) -> int:
    """Re-sign snapshot and timestamp with fresh expiry (run before the timestamp expires)."""
    _need_tuf()
    targets = repo._latest("targets")
    return repo._snapshot_timestamp(targets.signed.version, snapshot_days, timestamp_days)[1]


def rotate_key(repo: Repo, role: str) -> dict:
    """Replace ``role``'s key: a new root version lists the new key and is signed by the old root
    key (devices trust it through their current root) and, for root, by the new one too. The
    role's metadata is then re-signed with the new key. The old private key moves to keys/retired."""
    _need_tuf()
    from securesystemslib.signer import CryptoSigner

    if role not in ROLES:
        raise ReleaseError(f"unknown role {role!r}; one of {', '.join(ROLES)}")
    old_root_signer = repo.signer("root")
    old_signer = repo.signer(role)
    new = CryptoSigner.generate_ed25519()
    root_md = repo._latest("root")
    root = root_md.signed
    for keyid in list(root.roles[role].keyids):
        root.revoke_key(keyid, role)
    root.add_key(new.public_key, role)
    root.version += 1
    root.expires = _expiry("root")
    repo._sign_write("root", root_md, *((old_root_signer, new) if role == "root" else (old_root_signer,)))
    retired = repo.keys_dir / "retired"
    retired.mkdir(mode=0o700, exist_ok=True)
    shutil.move(str(repo.keys_dir / f"{role}.pem"),
                str(retired / f"{role}-{old_signer.public_key.keyid[:16]}.pem"))
    repo._write_key(role, new)
    if role == "targets":
        targets = repo._latest("targets")
        targets.signed.version += 1
        repo._sign_write("targets", targets)
        repo._snapshot_timestamp(targets.signed.version)
    elif role in ("snapshot", "timestamp"):
        repo._snapshot_timestamp(repo._latest("targets").signed.version)
    return {"role": role, "keyid": new.public_key.keyid, "root_version": root.version}


def status(repo: Repo) -> dict:
    _, channel = _current_targets(repo)
    ts = repo._latest("timestamp")
    return {"latest": channel.get("latest"), "releases": channel["releases"],
            "timestamp_expires": ts.signed.expires.isoformat(), "trust_anchor": str(repo.trust_anchor)}
