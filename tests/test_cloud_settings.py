"""Service settings: YAML + environment + command line, and errors that name the source and the field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cloud_service import cli
from cloud_service.settings import (
    DEFAULT_MANIFEST,
    ServiceSettings,
    SettingsError,
    apply_overrides,
    load_settings,
)

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "config" / "cloud.yaml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cloud.yaml"
    path.write_text(text)
    return path


def test_defaults_without_file_or_environment():
    s = load_settings(None, env={})
    assert s == ServiceSettings()
    assert s.model.manifest == DEFAULT_MANIFEST and s.model.name == "fashion-mnist"
    assert s.batching.enabled and s.server.host == "127.0.0.1"
    assert not s.auth.enabled and s.ray.autoscaling is None


def test_shipped_config_is_valid_and_differs_from_the_defaults_only_where_it_recommends():
    shipped = load_settings(SHIPPED, env={})
    assert shipped.runtime.instances == 2  # the 2-core recommendation
    assert shipped.model_copy(update={"runtime": ServiceSettings().runtime}) == ServiceSettings()


def test_file_values_and_relative_manifest(tmp_path):
    (tmp_path / "models").mkdir()
    path = write(tmp_path, "model:\n  manifest: models/m.json\n  name: other\nbatching:\n  max_batch_size: 8\n")
    s = load_settings(path, env={})
    assert s.model.manifest == (tmp_path / "models" / "m.json").resolve()
    assert s.model.name == "other" and s.batching.max_batch_size == 8


def test_environment_beats_the_file_and_parses_scalars(tmp_path):
    path = write(tmp_path, "batching:\n  max_batch_size: 8\n")
    env = {
        "HYBRID_CLOUD__BATCHING__MAX_BATCH_SIZE": "16",
        "HYBRID_CLOUD__BATCHING__ENABLED": "false",
        "HYBRID_CLOUD__BATCHING__MAX_QUEUE_DELAY_MS": "0.5",
        "HYBRID_CLOUD__AUTH__API_KEYS": "[0123456789abcdef0123]",
        "HYBRID_CLOUD__SERVER__HOST": "127.0.0.2",
        "UNRELATED": "x",
    }
    s = load_settings(path, env=env)
    assert s.batching.max_batch_size == 16 and s.batching.enabled is False
    assert s.batching.max_queue_delay_ms == 0.5 and s.server.host == "127.0.0.2"
    assert s.auth.resolve_keys({}) == (b"0123456789abcdef0123",)


def test_config_path_from_environment(tmp_path):
    path = write(tmp_path, "server:\n  port: 9123\n")
    assert load_settings(None, env={"HYBRID_CLOUD_CONFIG": str(path)}).server.port == 9123


def test_file_error_names_file_and_field(tmp_path):
    path = write(tmp_path, "batching:\n  max_batch_size: 0\n")
    with pytest.raises(SettingsError) as info:
        load_settings(path, env={})
    msg = str(info.value)
    assert str(path) in msg and "batching.max_batch_size" in msg and "got 0" in msg


def test_environment_error_names_the_variable_and_field(tmp_path):
    path = write(tmp_path, "")
    with pytest.raises(SettingsError) as info:
        load_settings(path, env={"HYBRID_CLOUD__RUNTIME__INTRA_OP_THREADS": "many"})
    msg = str(info.value)
    assert "HYBRID_CLOUD__RUNTIME__INTRA_OP_THREADS" in msg and "runtime.intra_op_threads" in msg
    assert str(path) not in msg


@pytest.mark.parametrize("text, field", [
    ("batching:\n  max_batch_siz: 8\n", "batching.max_batch_siz"),  # typo: extra fields are forbidden
    ("nonsense: 1\n", "nonsense"),
    ("server:\n  port: 70000\n", "server.port"),
    ("server:\n  log_level: loud\n", "server.log_level"),
    ("model:\n  name: 'a b/c'\n", "model.name"),
    ("ray:\n  autoscale_min_replicas: 4\n  autoscale_max_replicas: 2\n", "ray"),
    ("ray:\n  autoscale_min_replicas: 1\n", "ray"),
    ("auth:\n  api_keys: [short]\n", "auth.api_keys"),
    ("batching: 5\n", "batching"),
])
def test_invalid_values_name_the_field(tmp_path, text, field):
    path = write(tmp_path, text)
    with pytest.raises(SettingsError) as info:
        load_settings(path, env={})
    assert f"{path}: {field}" in str(info.value)


def test_short_key_is_not_echoed(tmp_path):
    path = write(tmp_path, "auth:\n  api_keys: [tiny-secret]\n")
    with pytest.raises(SettingsError) as info:
        load_settings(path, env={})
    assert "tiny-secret" not in str(info.value)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "batching:\n  max_batch_size: [8\nserver:\n")
    with pytest.raises(SettingsError) as info:
        load_settings(path, env={})
    assert str(path) in str(info.value) and "line" in str(info.value)


def test_unreadable_or_wrong_shape_files(tmp_path):
    with pytest.raises(SettingsError, match="not found"):
        load_settings(tmp_path / "missing.yaml", env={})
    with pytest.raises(SettingsError, match="mapping"):
        load_settings(write(tmp_path, "- a\n- b\n"), env={})
    assert load_settings(write(tmp_path, "# only comments\n"), env={}) == ServiceSettings()


def test_keys_from_environment_fail_closed():
    s = ServiceSettings.model_validate({"auth": {"api_keys_env": "MY_KEYS"}})
    assert s.auth.enabled
    with pytest.raises(SettingsError, match="MY_KEYS"):
        s.auth.resolve_keys({})
    with pytest.raises(SettingsError, match="MY_KEYS"):
        s.auth.resolve_keys({"MY_KEYS": " , "})
    with pytest.raises(SettingsError, match="shorter"):
        s.auth.resolve_keys({"MY_KEYS": "short"})
    assert s.auth.resolve_keys({"MY_KEYS": "x" * 16 + ", " + "y" * 16}) == (b"x" * 16, b"y" * 16)


def test_keys_are_hidden_in_dumps_but_survive_the_worker_handoff():
    key = "s3cret-" + "k" * 16
    s = ServiceSettings.model_validate({"auth": {"api_keys": [key]}})
    assert key not in repr(s) and key not in s.model_dump_json()
    assert ServiceSettings.from_json(s.to_json()).auth.resolve_keys({}) == (key.encode(),)


def test_overrides_name_the_option():
    s = apply_overrides(ServiceSettings(), {"server.port": ("--port", 9000), "server.host": ("--host", None)})
    assert s.server.port == 9000 and s.server.host == "127.0.0.1"
    with pytest.raises(SettingsError, match=r"option --port: server\.port"):
        apply_overrides(ServiceSettings(), {"server.port": ("--port", -1)})


def test_ray_autoscaling_config():
    s = ServiceSettings.model_validate({"ray": {"autoscale_min_replicas": 1, "autoscale_max_replicas": 3}})
    assert s.ray.autoscaling == {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 2.0}


def test_cli_check_prints_settings_and_reports_errors(tmp_path, capsys, monkeypatch):
    for name in [n for n in __import__("os").environ if n.startswith("HYBRID_CLOUD")]:
        monkeypatch.delenv(name)
    assert cli.main(["--config", str(SHIPPED), "--check", "--port", "9001", "--autoscale", "1,3"]) == 0
    out = capsys.readouterr().out
    assert '"port": 9001' in out and '"autoscale_max_replicas": 3' in out
    bad = write(tmp_path, "runtime:\n  instances: 0\n")
    assert cli.main(["--config", str(bad), "--check"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "runtime.instances" in err
    assert cli.main(["--check", "--autoscale", "two"]) == 2
    assert "--autoscale" in capsys.readouterr().err


def test_router_cli_dispatches_serve(capsys, monkeypatch):
    from router_tools.cli import main

    for name in [n for n in __import__("os").environ if n.startswith("HYBRID_CLOUD")]:
        monkeypatch.delenv(name)
    assert main(["serve", "--check"]) == 0
    assert '"max_batch_size": 32' in capsys.readouterr().out


def test_protocol_and_settings_do_not_import_the_web_stack():
    code = ("import sys, cloud_service, oip.protocol, cloud_service.settings, cloud_service.errors; "
            "bad = [m for m in ('fastapi', 'starlette', 'uvicorn') if m in sys.modules]; "
            "sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def _run_cli(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("HYBRID_CLOUD")}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "cloud_service", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=env)


def test_check_loads_the_model_as_start_up_would(tmp_path):
    broken = tmp_path / "broken-manifest.json"
    broken.write_text("{}")
    config = write(tmp_path, f"model:\n  manifest: {broken}\n")
    result = _run_cli("--config", str(config), "--check")
    assert result.returncode == cli.STARTUP_FAILURE, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert str(config) in lines[0] and "model.manifest" in lines[0] and "broken-manifest.json" in lines[0]


def test_cli_config_errors_are_one_line_exit_2(tmp_path):
    config = write(tmp_path, "server:\n  port: [1]\nlimits:\n  max_decoded_bytes: 1\n")
    for args, env in (((("--config", str(config))), None),
                      ((), {"HYBRID_CLOUD__SERVER__HEADER_TIMEOUT_S": "-1"})):
        result = _run_cli(*args, env_extra=env)
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert str(config) in _run_cli("--config", str(config)).stderr
    assert "server.header_timeout_s" in result.stderr and "HYBRID_CLOUD__SERVER__HEADER_TIMEOUT_S" in result.stderr


def test_manifest_tilde_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    config = write(tmp_path, "model:\n  manifest: ~/models/m.json\n")
    assert load_settings(config, env={}).model.manifest == tmp_path / "models" / "m.json"
    assert load_settings(None, env={"HYBRID_CLOUD__MODEL__MANIFEST": "~/x.json"}).model.manifest == tmp_path / "x.json"


def test_decode_budget_must_hold_one_image(tmp_path):
    config = write(tmp_path, "limits:\n  max_decoded_bytes: 200000000\n  decode_budget_bytes: 100000000\n")
    with pytest.raises(SettingsError, match="limits: .*max_decoded_bytes .* exceeds decode_budget_bytes"):
        load_settings(config, env={})
