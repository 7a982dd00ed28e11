"""Signed edge-model updates on the device: :class:`EdgeUpdater`.

The channel is a TUF repository of static files published by ``hybrid-router release`` (see
``router_tools/release.py``). Verification is python-tuf's ngclient ``Updater``: signatures and
thresholds against the trusted root shipped with the app, version order (a replayed older
release is refused: rollback protection), expiry (a frozen channel is refused: freeze
protection), and length + sha256 of every file. Nothing cryptographic is written here.

What this module adds around it, in a background thread that never runs on the request path and
never runs under privacy mode (no import of the network stack, no socket):

* the device's choice of release: a pinned version, else the newest release whose rollout share
  admits this device (``stable_hash(device_id, version) < rollout``; raising the share of a
  release keeps every device already in its cohort);
* a fresh :class:`~edge_model.runtime.OnnxClassifier` per release, validated before it answers
  (same input spec, labels the policy's ``class_thresholds`` can name, a warm-up run, the golden
  set shipped with the release) and swapped in between requests by the router. A release brings
  its own labels: when they differ from the current model's, the router answers with the new
  names and compares every cloud endpoint's published labels again (one that no longer matches
  becomes ``incompatible``). A release brings its calibration too: its manifest's
  ``calibration.threshold`` replaces the policy's thresholds while it answers, and its
  ``expected_escalation`` centres the drift band (a stronger model calibrated to the same
  escalation has another threshold), unless the policy says ``updates.calibration: policy``;
* an installed release stays when a policy reload changes ``edge:`` (the new model becomes what a
  rollback returns to): only ``updates.pin`` or a rollback replaces it;
* the last ``keep_versions`` versions kept on disk, rollback to the previous one (automatic when
  a release fails to load or validate -- the current model never stops answering -- or manual
  with ``Router.rollback_edge()``), and typed errors for every refusal.

Optional: needs ``pip install 'hybrid-edge-router[updates]'`` (tuf). Folder layout under
``updates.dir``: ``metadata/`` (tuf's trusted cache), ``models/<version>/``, ``state.json``,
``device_id``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import random
import shutil
import threading
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from edge_model.errors import EdgeModelError
from edge_model.runtime import OnnxClassifier, SessionOptions
from router.errors import ConfigError, PrivacyViolation, RouterError
from router.policy import RoutingPolicy, UpdateSettings

log = logging.getLogger("router.updates")

INSTALL_HINT = "pip install 'hybrid-edge-router[updates]'"
CHANNEL_TARGET = "edge/channel.json"
DEFAULT_DIR = Path.home() / ".cache" / "hybrid-edge-router" / "updates"
_CHANNEL_MAX_BYTES = 1024 * 1024


# ---------------------------------------------------------------------- errors


class UpdateError(RouterError):
    """An update check or install that did not happen; the current model keeps answering."""

    def __init__(self, message: str, *, version: str | None = None):
        super().__init__(message)
        self.version = version


class ChannelUnavailable(UpdateError):
    """The channel could not be read (down, timed out, cut mid-download); tried again next interval."""


class DownloadBudgetExceeded(UpdateError):
    """The release is larger than ``updates.max_download_bytes``."""


class ReleaseReplayed(UpdateError):
    """The channel offered metadata older than what this device already trusts (rollback attack)."""


class MetadataExpired(UpdateError):
    """The channel's signed metadata has expired (freeze attack, or the operator did not re-sign)."""


class TamperedMetadata(UpdateError):
    """Metadata whose signatures do not verify against the trusted root, or that is malformed."""


class TamperedArtifact(UpdateError):
    """A downloaded file whose length or sha256 differs from the signed metadata."""


class ReleaseRejected(UpdateError):
    """The release verified but its model failed to load or validate on this device (auto-rollback)."""


class LabelMismatch(ReleaseRejected):
    """The release's labels cannot serve this device's policy (a ``class_thresholds`` key it lacks)."""


class GoldenSetMismatch(ReleaseRejected):
    pass


class NothingToRollBack(UpdateError):
    pass


def require_tuf() -> None:
    """The import guard of the optional extra (no import: finding the package is enough here)."""
    if importlib.util.find_spec("tuf") is None:
        raise ConfigError(f"updates: the release channel needs the updates extra; run: {INSTALL_HINT}")


# ---------------------------------------------------------------------- cohort


def cohort_value(device_id: str, version: str) -> float:
    """A device's stable position in [0, 1) for one release: sha256, so uniform across devices and
    independent between releases (a device is not always among the first 5 %)."""
    digest = hashlib.sha256(f"{device_id}\0{version}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def in_rollout(device_id: str, version: str, share: float) -> bool:
    return cohort_value(device_id, version) < share


def choose_release(channel: dict, device_id: str, *, pin: str | None = None,
                   refused: frozenset[str] | set[str] = frozenset()) -> str | None:
    """The version this device should run: the pin, else the newest (by publish sequence) release
    it is in the rollout cohort of and has not refused; None when no release admits it."""
    releases = channel.get("releases") or {}
    if pin is not None:
        if pin not in releases:
            raise UpdateError(f"updates.pin: release {pin!r} is not in the channel; published: {sorted(releases)}",
                              version=pin)
        return pin
    for version in sorted(releases, key=lambda v: releases[v]["seq"], reverse=True):
        if version not in refused and in_rollout(device_id, version, float(releases[version].get("rollout", 0.0))):
            return version
    return None


# ---------------------------------------------------------------------- fetcher


def _make_fetcher(settings: UpdateSettings, deadline: float, verify):
    """tuf's ``FetcherInterface`` over httpx, written here rather than using tuf's default urllib3
    fetcher so that the channel follows the router's transport rules: no proxy or CA settings
    taken from the environment (``trust_env=False``, CAs from the policy's ``ca_bundle`` or
    certifi), explicit connect/read timeouts, no redirects, one byte budget across every file of
    a check (tuf caps each file at its signed length; this caps their sum) and a cap on the
    whole check's duration (a server dripping bytes cannot hold the updater forever)."""
    import httpx
    from tuf.api import exceptions as tex
    from tuf.ngclient import FetcherInterface

    class BudgetExceeded(tex.DownloadError):
        pass

    class HttpxFetcher(FetcherInterface):
        def __init__(self) -> None:
            self.received = 0
            self.client = httpx.Client(
                trust_env=False, follow_redirects=False,
                timeout=httpx.Timeout(settings.read_timeout_s, connect=settings.connect_timeout_s),
                verify=verify,
                limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
                headers={"User-Agent": "hybrid-edge-router-updater"},
            )

        def _fetch(self, url: str):
            return self._stream(url)

        def _stream(self, url: str):
            # Errors surface while tuf iterates: translated here into tuf's download errors.
            try:
                with self.client.stream("GET", url) as resp:
                    if resp.status_code != 200:
                        raise tex.DownloadHTTPError(f"GET {url}: HTTP {resp.status_code}", resp.status_code)
                    for chunk in resp.iter_bytes(64 * 1024):
                        self.received += len(chunk)
                        if self.received > settings.max_download_bytes:
                            raise BudgetExceeded(f"more than updates.max_download_bytes="
                                                 f"{settings.max_download_bytes} in one check")
                        if time.monotonic() > deadline:
                            raise tex.SlowRetrievalError(f"check took longer than updates.max_check_s="
                                                         f"{settings.max_check_s}")
                        yield chunk
            except tex.DownloadError:
                raise
            except httpx.TimeoutException as exc:
                raise tex.SlowRetrievalError(f"GET {url}: timed out ({exc.__class__.__name__})") from exc
            except httpx.HTTPError as exc:
                raise tex.DownloadError(f"GET {url}: {exc.__class__.__name__}: {exc}") from exc

    return HttpxFetcher(), BudgetExceeded


def _translate(exc: BaseException, stage: str, version: str | None, budget_exc: type) -> UpdateError:
    """tuf's exceptions as this module's typed errors (one line each)."""
    from tuf.api import exceptions as tex

    msg = f"{stage}: {exc}"
    if isinstance(exc, budget_exc):
        return DownloadBudgetExceeded(msg, version=version)
    if isinstance(exc, tex.BadVersionNumberError):
        return ReleaseReplayed(f"{stage}: the channel offered older metadata than this device trusts "
                               f"(replayed release): {exc}", version=version)
    if isinstance(exc, tex.ExpiredMetadataError):
        return MetadataExpired(f"{stage}: {exc}; the operator must re-sign (hybrid-router release refresh)",
                               version=version)
    if isinstance(exc, (tex.LengthOrHashMismatchError, tex.DownloadLengthMismatchError)) and stage != "metadata":
        return TamperedArtifact(f"{stage}: {exc}", version=version)
    if isinstance(exc, tex.RepositoryError):
        return TamperedMetadata(f"{stage}: {exc}", version=version)
    if isinstance(exc, tex.DownloadError):
        return ChannelUnavailable(msg, version=version)
    return UpdateError(msg, version=version)


# ---------------------------------------------------------------------- the updater


class EdgeUpdater:
    """Checks the channel, installs and validates releases, rolls back. See the module docstring.

    ``current()`` returns the model answering now (or None); ``install(model, release=True)`` swaps
    one in (the router's ``_swap_edge``; ``release=False`` for ``base``); ``policy()`` returns the router's current policy (privacy and pin
    are read at every check). ``base`` is the model the router started with: the last resort of
    a rollback."""

    def __init__(self, settings: UpdateSettings, *, root: Path, directory: Path, labels: tuple[str, ...],
                 current: Callable[[], Optional[OnnxClassifier]], install: Callable[..., None],
                 policy: Callable[[], RoutingPolicy], base: OnnxClassifier | None = None,
                 session_options: SessionOptions = SessionOptions()) -> None:
        self.settings = settings
        self.root = Path(root)
        self.dir = Path(directory)
        self.labels = tuple(labels)
        self._current, self._install, self._policy = current, install, policy
        self._base = base
        self._options = session_options
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._cycle_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._rng = random.Random()
        self._ssl = None  # the channel's SSL context (_ssl_context)
        self.checks = 0
        self.last_result: str | None = None
        self.last_error: UpdateError | None = None
        self.last_delta: str | None = None
        # Each install's timings: channel read with the new version chosen ("seen") -> downloaded ->
        # loaded and validated -> swapped in (monotonic seconds), newest last.
        self.updates: deque[dict[str, Any]] = deque(maxlen=32)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.device_id = settings.device_id or self._device_id()
        self._state = self._read_state()

    # -------------------------------------------------------------- state on disk

    def _device_id(self) -> str:
        path = self.dir / "device_id"
        try:
            return path.read_text().strip()
        except FileNotFoundError:
            device_id = uuid.uuid4().hex
            _atomic_write(path, device_id.encode())
            return device_id

    def _read_state(self) -> dict:
        try:
            state = json.loads((self.dir / "state.json").read_text())
        except (FileNotFoundError, ValueError):
            state = {}
        return {"active": state.get("active"), "history": list(state.get("history", [])),
                "refused": dict(state.get("refused", {}))}

    def _save_state(self) -> None:
        _atomic_write(self.dir / "state.json", json.dumps(self._state, indent=2).encode())

    def _model_dir(self, version: str) -> Path:
        return self.dir / "models" / version

    @property
    def active(self) -> str | None:
        """The release from the channel that answers now (None: the model the router started with)."""
        return self._state["active"]

    def set_base(self, model: OnnxClassifier) -> None:
        """The model a rollback past every release returns to (a policy reload that changed ``edge:``)."""
        self._base = model

    def on_disk(self) -> list[str]:
        models = self.dir / "models"
        return sorted(p.name for p in models.iterdir() if p.is_dir() and (p / "manifest.json").is_file()) \
            if models.is_dir() else []

    # -------------------------------------------------------------- start-up (disk only)

    def restore(self) -> str | None:
        """Install the version this device last activated (or its pin) from disk; no network.
        A version that no longer loads or validates is refused and the router keeps its model."""
        version = self.settings.pin if self.settings.pin in self.on_disk() else self._state["active"]
        if not version or version not in self.on_disk():
            return None
        try:
            self._activate(version, self._load_validated(version, None))
            return version
        except ReleaseRejected as exc:
            self._refuse(version, exc)
            return None

    # -------------------------------------------------------------- background thread

    def start(self) -> None:
        if self._thread is not None or self._policy().privacy_mode:
            return
        require_tuf()
        self._thread = threading.Thread(target=self._loop, name="router-updates", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        delay = 0.0  # first check at start: a device without a model wants one as soon as possible
        while not self._stop.is_set():
            self._wake.wait(delay)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.check_now()
            except PrivacyViolation:
                pass
            except UpdateError as exc:
                log.log(logging.INFO if isinstance(exc, ChannelUnavailable) else logging.ERROR,
                        "edge update refused, the current model stays: %s", exc)
            except Exception:  # noqa: BLE001 - the thread must survive anything and try again later
                log.exception("edge update check failed, the current model stays")
            # +-10 % so a fleet started together does not check in lock-step.
            delay = self._policy().updates.check_interval_s * self._rng.uniform(0.9, 1.1)

    def wake(self) -> None:
        """Check now instead of at the end of the interval (the thread does the work)."""
        self._wake.set()

    def close(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout_s)

    # -------------------------------------------------------------- one check

    def check_now(self) -> str:
        """One check, synchronously: ``updated:<v>``, ``current:<v>``, ``no_release`` or
        ``not_in_cohort``. Raises a typed :class:`UpdateError` on refusal (the current model
        stays), :class:`PrivacyViolation` under privacy mode (nothing is attempted)."""
        with self._cycle_lock:
            self.checks += 1
            try:
                result = self._check()
            except UpdateError as exc:
                self.last_error, self.last_result = exc, f"refused:{type(exc).__name__}"
                raise
            self.last_result, self.last_error = result, None
            return result

    def _ssl_context(self):
        """Built once per updater: loading a CA bundle costs 50-150 ms, which every check paid.
        An http channel gets a context that trusts nothing (verification on, no CA loaded)."""
        if self._ssl is None:
            import ssl

            from router.cloud import make_ssl_context

            self._ssl = (make_ssl_context(True, self.settings.ca_bundle) if self.settings.url.startswith("https://")
                         else ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
        return self._ssl

    def _check(self) -> str:
        policy = self._policy()
        if policy.privacy_mode:
            raise PrivacyViolation("updates: no update check under privacy mode")
        require_tuf()
        from tuf.ngclient import Updater, UpdaterConfig

        settings = self.settings
        pin = policy.updates.pin if policy.updates.enabled else settings.pin
        fetcher, budget_exc = _make_fetcher(settings, time.monotonic() + settings.max_check_s, self._ssl_context())
        meta_dir = self.dir / "metadata"
        meta_dir.mkdir(exist_ok=True)
        cached_root = meta_dir / "root.json"
        # The cached root is the newest root this device verified (through the chain from the
        # shipped one); the shipped root only bootstraps an empty cache.
        bootstrap = (cached_root if cached_root.is_file() else self.root).read_bytes()
        cap = settings.max_download_bytes
        config = UpdaterConfig(root_max_length=min(512_000, cap), timestamp_max_length=min(16_384, cap),
                               snapshot_max_length=min(2_000_000, cap), targets_max_length=min(5_000_000, cap))
        base = settings.url.rstrip("/")
        staging = self.dir / "staging"
        try:
            with fetcher.client:
                try:
                    updater = Updater(str(meta_dir), f"{base}/metadata/", str(staging), f"{base}/targets/",
                                      fetcher=fetcher, config=config, bootstrap=bootstrap)
                    updater.refresh()
                    info = updater.get_targetinfo(CHANNEL_TARGET)
                except Exception as exc:  # noqa: BLE001 - translated below
                    if isinstance(exc, UpdateError):
                        raise
                    raise _translate(exc, "metadata", None, budget_exc) from exc
                if info is None:
                    return "no_release"
                if info.length > _CHANNEL_MAX_BYTES:
                    raise TamperedMetadata(f"channel file of {info.length} bytes is larger than {_CHANNEL_MAX_BYTES}")
                shutil.rmtree(staging, ignore_errors=True)
                staging.mkdir(parents=True)
                try:
                    channel = json.loads(Path(updater.download_target(info, str(staging / "channel.json"))).read_text())
                except UpdateError:
                    raise
                except Exception as exc:  # noqa: BLE001
                    raise _translate(exc, "channel", None, budget_exc) from exc
                version = choose_release(channel, self.device_id, pin=pin, refused=set(self._state["refused"]))
                current = self._current()
                if version is None:
                    return "not_in_cohort"
                if current is not None and current.version == version and self._state["active"] == version:
                    return f"current:{version}"
                if version in self._state["refused"] and pin is None:
                    return f"current:{current.version if current else None}"
                entry = channel["releases"][version]
                timing = {"version": version, "from": current.version if current else None,
                          "seen": time.monotonic()}
                if version not in self.on_disk():
                    self._download(updater, entry, version, staging, fetcher, budget_exc)
                timing["downloaded"] = time.monotonic()
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if self._stop.is_set():
            return "closed"  # the router closed during the download: install nothing
        try:
            model = self._load_validated(version, entry)
        except ReleaseRejected as exc:
            self._refuse(version, exc)
            shutil.rmtree(self._model_dir(version), ignore_errors=True)
            raise
        timing["validated"] = time.monotonic()
        self._activate(version, model)
        timing["swapped"] = time.monotonic()
        self.updates.append(timing)
        self._prune()
        return f"updated:{version}"

    def _delta_base(self, entry: dict) -> tuple[str, Path] | None:
        """A delta of this release whose base model this device holds (sha256 checked), if any."""
        if not entry.get("deltas") or importlib.util.find_spec("zstandard") is None:
            return None
        from edge_model.manifest import Manifest, sha256_file

        for prev, delta in entry["deltas"].items():
            folder = self._model_dir(prev)
            try:
                model = folder / Manifest.load(folder / "manifest.json").file
                if sha256_file(model) == delta["base_sha256"]:
                    return delta["path"], model
            except EdgeModelError:
                continue
        return None

    def _download(self, updater, entry: dict, version: str, staging: Path, fetcher, budget_exc) -> None:
        model_name = entry["model"].rpartition("/")[2]
        delta = self._delta_base(entry)
        model_path = delta[0] if delta else entry["model"]
        paths = [entry["manifest"], model_path] + ([entry["golden"]] if entry.get("golden") else [])
        infos = []
        for p in paths:
            try:
                info = updater.get_targetinfo(p)
            except Exception as exc:  # noqa: BLE001
                raise _translate(exc, "metadata", version, budget_exc) from exc
            if info is None:
                raise TamperedMetadata(f"release {version}: target {p} is in the channel but not in the signed targets",
                                       version=version)
            infos.append(info)
        need = sum(i.length for i in infos)
        if fetcher.received + need > self.settings.max_download_bytes:
            raise DownloadBudgetExceeded(
                f"release {version} needs {need} bytes, over updates.max_download_bytes={self.settings.max_download_bytes}",
                version=version)
        part = staging / version
        part.mkdir(parents=True)
        names = {entry["manifest"]: "manifest.json", entry.get("golden"): "golden.npz", model_path: model_name}
        if delta:
            names[model_path] = model_name + ".patch"
        for info in infos:
            name = names.get(info.path) or info.path.rpartition("/")[2]
            try:
                updater.download_target(info, str(part / name))
            except Exception as exc:  # noqa: BLE001
                raise _translate(exc, f"release {version}: {info.path}", version, budget_exc) from exc
        if delta:
            self._apply_delta(part / (model_name + ".patch"), delta[1], part / model_name, entry, version)
        (part / "release.json").write_text(json.dumps(entry, indent=2))
        dest = self._model_dir(version)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(part, dest)  # a version folder is complete or absent

    def _apply_delta(self, patch: Path, base: Path, out: Path, entry: dict, version: str) -> None:
        """The model from a zstd patch against a model this device holds (``release --delta-from``).
        tuf verified the patch; the rebuilt file must have the release's signed sha256."""
        import zstandard as zstd

        from edge_model.manifest import sha256_file

        d = zstd.ZstdCompressionDict(base.read_bytes(), dict_type=zstd.DICT_TYPE_RAWCONTENT)
        try:
            data = zstd.ZstdDecompressor(dict_data=d, max_window_size=1 << 27).decompress(
                patch.read_bytes(), max_output_size=self.settings.max_download_bytes)
        except zstd.ZstdError as exc:
            raise TamperedArtifact(f"release {version}: the patch does not apply: {exc}", version=version) from exc
        out.write_bytes(data)
        patch.unlink()
        if sha256_file(out) != entry["sha256"]:
            raise TamperedArtifact(f"release {version}: the model rebuilt from the patch has another sha256",
                                   version=version)
        self.last_delta = f"{version} from {base.parent.name}: {patch.name}"

    # -------------------------------------------------------------- validation and swap

    def _load_validated(self, version: str, entry: dict | None) -> OnnxClassifier:
        folder = self._model_dir(version)
        if entry is None:
            try:
                entry = json.loads((folder / "release.json").read_text())
            except (OSError, ValueError):
                entry = {}
        try:
            model = OnnxClassifier(folder / "manifest.json", options=self._options)  # sha256 again, warm-up runs
        except EdgeModelError as exc:
            raise ReleaseRejected(f"release {version}: the model does not load: {exc}", version=version) from exc
        if model.version != version:
            raise ReleaseRejected(f"release {version}: its manifest says version {model.version}", version=version)
        try:  # a release brings its own labels, but the policy's per-class thresholds must name them
            self._policy().thresholds_for(tuple(model.labels))
        except ConfigError as exc:
            raise LabelMismatch(f"release {version}: its labels do not fit the policy: {exc}", version=version) from None
        current = self._current()
        if current is not None and _input_spec(model) != _input_spec(current):
            raise ReleaseRejected(f"release {version}: input spec {_input_spec(model)} differs from the current "
                                  f"model's {_input_spec(current)}; that change needs an app update", version=version)
        cfg = model.preprocess_config
        try:
            probs = model.predict_proba(np.zeros((2, *cfg.sample_shape), dtype=cfg.np_dtype))
        except EdgeModelError as exc:
            raise ReleaseRejected(f"release {version}: warm-up run failed: {exc}", version=version) from exc
        if not np.isfinite(probs).all() or not np.allclose(probs.sum(axis=1), 1.0, atol=1e-3):
            raise ReleaseRejected(f"release {version}: warm-up run gave no probabilities", version=version)
        golden = folder / "golden.npz"
        if golden.is_file():
            self._check_golden(model, golden, version, float(entry.get("golden_min_agreement", 0.95)))
        return model

    @staticmethod
    def _check_golden(model: OnnxClassifier, path: Path, version: str, floor: float) -> None:
        cfg = model.preprocess_config
        try:
            with np.load(path, allow_pickle=False) as data:
                x, labels = data["x"].astype(cfg.np_dtype), data["labels"]
        except (OSError, ValueError, KeyError) as exc:
            raise GoldenSetMismatch(f"release {version}: unreadable golden set: {exc}", version=version) from exc
        if x.shape[1:] != tuple(cfg.sample_shape) or labels.shape != (x.shape[0],) or x.shape[0] == 0:
            raise GoldenSetMismatch(f"release {version}: golden set shapes {x.shape} / {labels.shape} do not fit the "
                                    "model", version=version)
        agreement = float((model.predict_proba(x).argmax(axis=1) == labels).mean())
        if agreement < floor:
            raise GoldenSetMismatch(f"release {version}: agrees with {agreement:.1%} of its golden set, under the "
                                    f"{floor:.1%} floor", version=version)

    def _activate(self, version: str, model: OnnxClassifier) -> None:
        self._install(model)
        st = self._state
        st["active"] = version
        st["history"] = [v for v in st["history"] if v != version] + [version]
        st["refused"].pop(version, None)
        self._save_state()
        log.info("edge model %s installed from the release channel", version)

    def _refuse(self, version: str, exc: UpdateError) -> None:
        # Refused on this device: not downloaded or tried again until the operator publishes another.
        self._state["refused"][version] = str(exc)
        self._save_state()
        log.error("edge release %s refused, the current model stays: %s", version, exc)

    def _prune(self) -> None:
        keep = set(self._state["history"][-self.settings.keep_versions:])
        keep |= {v for v in (self._state["active"], self.settings.pin) if v}
        for version in self.on_disk():
            if version not in keep:
                shutil.rmtree(self._model_dir(version), ignore_errors=True)
        self._state["history"] = [v for v in self._state["history"] if v in keep]
        self._save_state()

    # -------------------------------------------------------------- rollback

    def rollback(self, reason: str = "rolled back by the operator") -> str:
        """Swap back to the previous version on disk (else the model the router started with) and
        refuse the current one until a newer release is published. Returns the version answering."""
        with self._cycle_lock:
            st = self._state
            active = st["active"]
            if active is None:
                raise NothingToRollBack("rollback_edge: no release from the channel is active; nothing to roll back")
            for version in reversed(st["history"][:-1] if st["history"] and st["history"][-1] == active
                                    else st["history"]):
                if version == active or version in st["refused"] or version not in self.on_disk():
                    continue
                try:
                    model = self._load_validated(version, None)
                except ReleaseRejected as exc:
                    self._state["refused"][version] = str(exc)
                    continue
                st["refused"][active] = reason  # not taken again until the operator publishes another
                self._activate(version, model)
                log.warning("edge release %s rolled back (%s); %s answers now", active, reason, version)
                return version
            if self._base is None:
                raise NothingToRollBack("rollback_edge: no earlier version on disk and no bundled model to go back to")
            self._install(self._base, release=False)
            st["refused"][active] = reason
            st["active"] = None
            self._save_state()
            log.warning("edge release %s rolled back (%s) to the bundled model %s", active, reason, self._base.version)
            return self._base.version

    def status(self) -> dict[str, Any]:
        cur = self._current()
        return {"active": self._state["active"], "answering": cur.version if cur else None,
                "base": self._base.version if self._base is not None else None,  # what a rollback ends at
                "device_id": self.device_id, "checks": self.checks, "last_result": self.last_result,
                "last_error": None if self.last_error is None else f"{type(self.last_error).__name__}: {self.last_error}",
                "refused": dict(self._state["refused"]), "on_disk": self.on_disk(), "last_delta": self.last_delta,
                "last_update": _timing(self.updates[-1]) if self.updates else None}


def _timing(t: dict) -> dict:
    """One install's timings in milliseconds from the moment the check saw the new version."""
    seen = t["seen"]
    return {"version": t["version"], "from": t["from"],
            **{f"{k}_ms": round((t[k] - seen) * 1000.0, 1) for k in ("downloaded", "validated", "swapped")}}


def _input_spec(model: OnnxClassifier) -> dict:
    # The manifest's whole input contract (shape, layout, colour, scalar or per-channel mean/std,
    # resize, inversion...): a release that preprocesses differently is not a drop-in swap.
    return model.manifest.input.model_dump(mode="json")


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def attach_updater(router, policy_path: Path | None = None) -> EdgeUpdater | None:
    """The router's hook: build the updater its policy asks for, install the last activated
    version from disk, and start checking in the background unless privacy mode is on."""
    policy = router.policy
    s = policy.updates
    if not s.enabled:
        return None
    require_tuf()
    here = policy_path.parent if policy_path is not None else Path.cwd()
    root = Path(s.root)
    root = root if root.is_absolute() else here / root
    if not root.is_file():
        raise ConfigError(f"updates.root: {root} is not a file; ship the channel's 1.root.json with the app")
    directory = Path(s.dir) if s.dir else DEFAULT_DIR
    directory = directory if directory.is_absolute() else here / directory
    updater = EdgeUpdater(s, root=root, directory=directory, labels=router._labels,
                          current=lambda: router.edge_model, install=router._swap_edge,
                          policy=lambda: router.policy, base=router.edge_model,
                          session_options=SessionOptions(intra_op_threads=policy.edge.intra_op_threads))
    updater.restore()
    if not policy.privacy_mode:
        # Imported here, before any request: importing tuf's client holds the GIL for ~25 ms, which
        # in the updater's thread at its first check would stall every predict past its deadline.
        import tuf.ngclient  # noqa: F401
        try:
            import zstandard  # noqa: F401 -- deltas (the updates extra brings it)
        except ImportError:
            pass
    if router.edge_model is None:  # "no model yet": the cloud answers (reason edge_error) until the swap
        from router.errors import EdgeError

        router._edge_error = EdgeError("no edge model yet: downloading from the release channel; the cloud answers "
                                       "meanwhile" if not policy.privacy_mode else
                                       "no edge model, and privacy mode forbids downloading one")
    updater.start()
    return updater
