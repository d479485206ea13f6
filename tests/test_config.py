"""Settings: YAML < environment < overrides; unknown keys are errors naming file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from lake.config import PROJECT_ROOT, ConfigError, load_settings


def _yaml(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "lambdarec.yaml"
    p.write_text(text)
    return p


def test_defaults_without_file() -> None:
    s = load_settings(path=None, env={})
    # no LAMBDAREC_CONFIG: the repo's infra/lambdarec.yaml (or pure defaults) applies
    assert s.server.host == "127.0.0.1"
    assert s.lake.root.is_absolute()


def test_yaml_then_env_then_overrides(tmp_path: Path) -> None:
    cfg = _yaml(tmp_path, """
server:
  port: 6000
  workers: 3
spark:
  master: "local[2]"
  conf:
    spark.sql.adaptive.enabled: "false"
lake:
  root: data/lake
""")
    env = {
        "LAMBDAREC__SERVER__PORT": "7000",
        "LAMBDAREC__TRAIN__FACTORS": "32",
        "LAMBDAREC__TRAIN__USE_GPU": "false",
        "UNRELATED": "x",
    }
    s = load_settings(cfg, env=env)
    assert s.server.port == 7000  # env beats YAML
    assert s.server.workers == 3  # YAML beats default
    assert s.server.admin_port == 50052  # default
    assert s.train.factors == 32 and s.train.use_gpu is False  # env values typed as YAML scalars
    assert s.spark.master == "local[2]"
    assert s.spark.conf == {"spark.sql.adaptive.enabled": "false"}
    assert s.lake.root == PROJECT_ROOT / "data" / "lake"  # relative paths anchored at the repo

    s2 = load_settings(cfg, env=env, overrides={"server": {"port": 7100}})
    assert s2.server.port == 7100  # explicit overrides beat env
    assert s2.server.workers == 3


def test_config_file_from_env_variable(tmp_path: Path) -> None:
    cfg = _yaml(tmp_path, "server:\n  port: 6111\n")
    assert load_settings(env={"LAMBDAREC_CONFIG": str(cfg)}).server.port == 6111


def test_unknown_yaml_key_names_file_and_key(tmp_path: Path) -> None:
    cfg = _yaml(tmp_path, "server:\n  prot: 6000\n")
    with pytest.raises(ConfigError) as err:
        load_settings(cfg, env={})
    msg = str(err.value)
    assert str(cfg) in msg
    assert "server.prot" in msg


def test_unknown_section_and_env_key_rejected(tmp_path: Path) -> None:
    cfg = _yaml(tmp_path, "servre:\n  port: 1\n")
    with pytest.raises(ConfigError, match="servre"):
        load_settings(cfg, env={})
    with pytest.raises(ConfigError, match=r"train\.factorz"):
        load_settings(_yaml(tmp_path, "{}\n"), env={"LAMBDAREC__TRAIN__FACTORZ": "8"})


def test_invalid_values_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"server\.port"):
        load_settings(_yaml(tmp_path, "server:\n  port: 70000\n"), env={})
    with pytest.raises(ConfigError, match="teleport"):
        load_settings(_yaml(tmp_path, "interactions:\n  weights:\n    teleport: 1.0\n"), env={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.yaml", env={})
    with pytest.raises(ConfigError, match="mapping"):
        load_settings(_yaml(tmp_path, "- a\n- b\n"), env={})


def test_env_values_are_parsed_by_their_field_type() -> None:
    s = load_settings(env={
        "LAMBDAREC__SERVER__ADMIN_TOKEN": "0755",  # YAML would read an octal number
        "LAMBDAREC__SPARK__APP_NAME": "no",  # ...and a boolean
        "LAMBDAREC__SPARK__DRIVER_MEMORY": "1e3",  # ...and a float
        "LAMBDAREC__TUNE__ENABLED": "no",
        "LAMBDAREC__TRAIN__REGULARIZATION": "null",
        "LAMBDAREC__SERVER__SEEN_EVENT_TYPES": "[view, click]",
        "LAMBDAREC__INTERACTIONS__WEIGHTS": '{"view": 2}',
        "LAMBDAREC__SERVER__WAL_DIR": "/tmp/0755",
    }, path=None)
    assert s.server.admin_token == "0755" and s.spark.app_name == "no"
    assert s.spark.driver_memory == "1e3"
    assert s.tune.enabled is False and s.train.regularization is None
    assert s.server.seen_event_types == ["view", "click"]
    assert s.interactions.weights["view"] == 2.0
    assert s.server.wal_dir == Path("/tmp/0755")


def test_list_and_mapping_elements_are_read_by_their_element_type() -> None:
    # YAML 1.1 would turn `no` into False and `0755` into 493 (octal) inside the list.
    s = load_settings(env={
        "LAMBDAREC__AIRFLOW__RELOAD_TARGETS": "[no, 0755, '0755', off]",
        "LAMBDAREC__SPARK__CONF": "{spark.foo: no, spark.bar: 0755}",
        "LAMBDAREC__EVALUATE__K": "[5, 010]",
        "LAMBDAREC__INTERACTIONS__WEIGHTS": '{"view": 0.5, "click": 1e1}',
    }, path=None)
    assert s.airflow.reload_targets == ["no", "0755", "0755", "off"]
    assert s.spark.conf == {"spark.foo": "no", "spark.bar": "0755"}
    assert s.evaluate.k == [5, 10]  # integers read as decimal, the way a plain int value is
    assert s.interactions.weights["view"] == 0.5 and s.interactions.weights["click"] == 10.0


@pytest.mark.parametrize("name,value", [
    ("LAMBDAREC__SERVER__PORT", "abc"),
    ("LAMBDAREC__DATA__SOURCE", "no"),
    ("LAMBDAREC__SERVER__PROT", "1"),
    ("LAMBDAREC__SERVER__SEEN_EVENT_TYPES", "view"),
])
def test_env_errors_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        load_settings(env={name: value}, path=None)


def test_unknown_key_suggests_the_close_one_and_names_the_env_variable(tmp_path: Path) -> None:
    cfg = _yaml(tmp_path, "server:\n  prot: 6000\n")
    with pytest.raises(ConfigError) as err:
        load_settings(cfg, env={})
    assert str(err.value) == f"{cfg}: unknown key server.prot; did you mean server.port?"
    with pytest.raises(ConfigError) as err:
        load_settings(_yaml(tmp_path, "{}\n"), env={"LAMBDAREC__SERVER__ADMIN_PROT": "1"})
    assert str(err.value) == ("environment variable LAMBDAREC__SERVER__ADMIN_PROT: unknown key "
                              "server.admin_prot; did you mean server.admin_port?")
    with pytest.raises(ConfigError) as err:
        load_settings(_yaml(tmp_path, "{}\n"), env={"LAMBDAREC__SERVER__PORT": "http"})
    assert str(err.value).startswith("environment variable LAMBDAREC__SERVER__PORT: server.port:")


def test_config_cli_help_and_check(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    run = [sys.executable, "-m", "lake.config"]
    out = subprocess.run([*run, "--help"], capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert out.returncode == 0 and out.stdout.startswith("usage: python -m lake.config")
    env = {**os.environ, "LAMBDAREC__SERVER__PROT": "1"}
    out = subprocess.run([*run, "--check"], capture_output=True, text=True, env=env,
                         cwd=PROJECT_ROOT)
    assert out.returncode == 2
    assert out.stderr == ("config error: environment variable LAMBDAREC__SERVER__PROT: unknown "
                          "key server.prot; did you mean server.port?\n")
