"""infra/: the Dockerfile, the docker-compose file and the Kubernetes manifests agree with
the code they deploy.

No Docker engine or cluster here, so the files are parsed (YAML) and cross-checked against
what they name: every LAMBDAREC__* variable is loaded through the real settings model
(`lake.config.load_settings`, key and value, on top of infra/lambdarec.yaml as in the
image); ports, probes and reload targets against the settings they produce; `python -m`
modules and `make` targets against the repository; `airflow` commands and AIRFLOW__*
options against Airflow's own CLI parser and configuration (in a subprocess with a
throw-away AIRFLOW_HOME).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from lake.config import PROJECT_ROOT, Settings, load_settings
from online.node_identity import check_node_id
from online.service import service_names

INFRA = PROJECT_ROOT / "infra"
COMPOSE_FILE = INFRA / "docker-compose.yml"
COMPOSE_FLEET = INFRA / "docker-compose.fleet.yml"
COMPOSE_HAPROXY = INFRA / "haproxy.compose.cfg"
DOCKER_DNS = "127.0.0.11:53"  # Docker's embedded resolver on user-defined networks
DOCKERFILE = INFRA / "Dockerfile"
K8S = INFRA / "k8s"
K8S_FLEET = K8S / "fleet"
RECOMMENDER = service_names()[0]
ONLINE_MODULE = "online.server"
OTHER_VARIABLES = {"LAMBDAREC_CONFIG",  # lake.config: another YAML file
                   "LAMBDAREC_NO_BROWSER"}  # infra/scripts/ensure_system.sh: no Chromium


# -- helpers -------------------------------------------------------------------------------
def settings_from(env: Mapping[str, str]) -> Settings:
    """The settings a container with `env` runs with (unknown keys, bad values: errors)."""
    lambdarec = {k: v for k, v in env.items() if k.startswith("LAMBDAREC")}
    strays = sorted(k for k in lambdarec
                    if not k.startswith("LAMBDAREC__") and k not in OTHER_VARIABLES)
    assert not strays, f"not config variables (LAMBDAREC__<SECTION>__<KEY>): {strays}"
    return load_settings(env=lambdarec)


def is_under(path: Path | str, mount: str) -> bool:
    return PurePosixPath(str(path)).is_relative_to(PurePosixPath(mount))


def python_modules(command: list[str]) -> list[str]:
    return [command[i + 1] for i, a in enumerate(command[:-1]) if a == "-m"]


def assert_modules_exist(command: list[str]) -> None:
    for module in python_modules(command):
        spec = importlib.util.find_spec(module)
        assert spec is not None, f"{command}: no module {module}"
        if spec.submodule_search_locations is not None:  # a package runs its __main__
            assert importlib.util.find_spec(f"{module}.__main__") is not None, module


def make_targets() -> set[str]:
    text = (PROJECT_ROOT / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z0-9_-]+):", text, flags=re.M))


def airflow_problems(commands: list[list[str]], env: Mapping[str, str]) -> list[str]:
    """Commands that Airflow's CLI parser refuses and AIRFLOW__<SECTION>__<KEY> variables
    that are not Airflow options, checked by Airflow itself in a subprocess."""
    options = sorted({tuple(k[len("AIRFLOW__"):].lower().split("__", 1))
                      for k in env if k.startswith("AIRFLOW__")})
    script = """
import contextlib, io, json, sys
from airflow.cli.cli_parser import get_parser
from airflow.configuration import conf
req = json.load(sys.stdin)
parser, bad = get_parser(), []
for argv in req["commands"]:
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            parser.parse_args(argv)
    except SystemExit:
        bad.append("airflow " + " ".join(argv))
known = conf.configuration_description  # every documented option, set or not
for section, key in req["options"]:
    if key not in known.get(section, {}).get("options", {}):
        bad.append(f"AIRFLOW__{section.upper()}__{key.upper()}")
print(json.dumps(bad))
"""
    home = PROJECT_ROOT / "var" / "test-deploy-airflow"
    home.mkdir(parents=True, exist_ok=True)
    run_env = {**os.environ, "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    out = subprocess.run([sys.executable, "-c", script], input=json.dumps(
        {"commands": [c[1:] for c in commands], "options": options}), env=run_env,
        capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    return list(json.loads(out.stdout.strip().splitlines()[-1]))


def assert_spark_connection(env: Mapping[str, str], settings: Settings) -> None:
    """The DAG submits to connection `airflow.spark_conn_id`: it must be defined."""
    name = f"AIRFLOW_CONN_{settings.airflow.spark_conn_id.upper()}"
    assert name in env, f"{name} missing: the DAG's Spark jobs would have no master"
    conn = json.loads(env[name])
    assert conn["conn_type"] == "spark" and conn["host"], conn


# -- docker compose --------------------------------------------------------------------------
_INTERPOLATION = re.compile(r"\$\{(\w+)(?::?([-?])([^}]*))?\}")


def interpolate(value: Any) -> str:
    """Compose's `${VAR:-default}` -> default, `${VAR:?message}` (required) -> a sample."""
    def sub(m: re.Match[str]) -> str:
        return m.group(3) if m.group(2) == "-" else f"sample-{m.group(1).lower()}"
    return _INTERPOLATION.sub(sub, str(value))


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE_FILE.read_text()))


def compose_env(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    assert isinstance(env, dict), "environment as a mapping"
    return {k: interpolate(v) for k, v in env.items()}


def compose_mounts(service: Mapping[str, Any]) -> dict[str, str]:
    """container path -> named volume."""
    out = {}
    for spec in service.get("volumes", []):
        volume, path = spec.split(":")[:2]
        out[path] = volume
    return out


def online_services(compose: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    found = {name: s for name, s in compose["services"].items()
             if ONLINE_MODULE in python_modules(s.get("command", []))}
    assert len(found) >= 2, "compose runs at least two online replicas"
    return found


def test_compose_variables_are_config_keys_with_valid_values(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        try:
            settings_from(compose_env(service))
        except Exception as exc:  # noqa: BLE001 - say which service
            pytest.fail(f"service {name}: {exc}")


def test_compose_online_replicas_ports_health_identity_and_volumes(
        compose: dict[str, Any]) -> None:
    services = online_services(compose)
    node_ids, wal_volumes, data_volumes = set(), set(), set()
    for name, service in services.items():
        s = settings_from(compose_env(service)).server
        assert s.host == "0.0.0.0", f"{name}: must listen beyond the container's loopback"
        published = {int(p.split(":")[-1]) for p in service["ports"]}
        assert {s.port, s.admin_port, s.metrics_port} <= published, name
        test = service["healthcheck"]["test"]
        assert test[0] == "CMD" and python_modules(test) == ["lambdarec_client"], test
        assert test[test.index("--target") + 1] == f"127.0.0.1:{s.port}", test
        assert test[test.index("health") + 2] == RECOMMENDER, test
        assert s.node_id is not None and check_node_id(s.node_id), name
        node_ids.add(s.node_id)
        mounts = compose_mounts(service)
        wal = [m for m in mounts if is_under(s.wal_dir, m)]
        assert wal, f"{name}: server.wal_dir {s.wal_dir} is on no volume"
        wal_volumes.add(mounts[wal[0]])
        settings = settings_from(compose_env(service))
        for path in (settings.lake.root, settings.model.dir):
            shared = [m for m in mounts if is_under(path, m)]
            assert shared, f"{name}: {path} is on no volume"
            data_volumes.add(mounts[shared[0]])
    assert len(node_ids) == len(services), f"node ids must differ: {node_ids}"
    assert len(wal_volumes) == len(services), f"one WAL volume per replica: {wal_volumes}"
    assert len(data_volumes) == 1, f"one shared lake/model volume: {data_volumes}"
    others = [n for n, sv in compose["services"].items() if n not in services
              and wal_volumes & set(compose_mounts(sv).values())]
    assert not others, f"a replica's WAL volume is mounted elsewhere: {others}"
    assert wal_volumes | data_volumes <= set(compose["volumes"])


def test_compose_batch_side_reaches_every_replica_and_the_lake(compose: dict[str, Any]) -> None:
    services = online_services(compose)
    expected = sorted(f"{n}:{settings_from(compose_env(s)).server.admin_port}"
                      for n, s in services.items())
    online_lake = {settings_from(compose_env(s)).lake.root for s in services.values()}
    airflow = {n: s for n, s in compose["services"].items()
               if s.get("command", [""])[0] == "airflow"}
    roles = {tuple(s["command"][1:2]) for s in airflow.values()}
    assert {("db",), ("api-server",), ("scheduler",), ("dag-processor",)} <= roles
    for name, service in airflow.items():
        env = compose_env(service)
        settings = settings_from(env)
        assert sorted(settings.airflow.reload_targets or []) == expected, name
        assert {settings.lake.root} == online_lake, name
        assert env["AIRFLOW__CORE__DAGS_FOLDER"] == "/app/dags"  # WORKDIR /app + COPY . .
        assert_spark_connection(env, settings)
        api = compose["services"]["airflow-api-server"]["command"]
        port = api[api.index("--port") + 1]
        assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == \
            f"http://airflow-api-server:{port}/execution/"
        if service["command"][1] in ("scheduler", "api-server", "dag-processor"):
            assert compose_mounts(service).get("/airflow") == "airflow-home", name


def test_compose_commands_exist(compose: dict[str, Any]) -> None:
    airflow_commands, airflow_env = [], {}
    for service in compose["services"].values():
        command = service.get("command") or []
        assert_modules_exist(command)
        test = (service.get("healthcheck") or {}).get("test") or []
        assert_modules_exist(test)
        if command and command[0] == "airflow":
            airflow_commands.append(command)
            airflow_env.update(compose_env(service))
        build = service.get("build")
        if build:
            context = (COMPOSE_FILE.parent / build["context"]).resolve()
            assert context == PROJECT_ROOT
            assert (context / build["dockerfile"]).resolve() == DOCKERFILE
    assert airflow_problems(airflow_commands, airflow_env) == []


# -- Dockerfile ------------------------------------------------------------------------------
def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_runs_the_projects_own_setup_and_serves_by_default() -> None:
    inst = dockerfile_instructions()
    assert inst[0][0] == "FROM" and "python:3.11" in inst[0][1]  # pyproject: >=3.11,<3.13
    runs = [rest for word, rest in inst if word == "RUN"]
    made = [t for r in runs for t in re.findall(r"\bmake ([a-z-]+)", r)]
    assert "setup" in made and set(made) <= make_targets(), made
    env: dict[str, str] = {}
    for word, rest in inst:
        if word == "ENV":
            env.update(dict(kv.split("=", 1) for kv in shlex.split(rest)))
    assert env.get("LAMBDAREC_NO_BROWSER") == "1"  # read by infra/scripts/ensure_system.sh
    assert "LAMBDAREC_NO_BROWSER" in (INFRA / "scripts" / "ensure_system.sh").read_text()
    settings = settings_from(env)
    made_dirs = " ".join(runs)
    for path in (settings.lake.root, settings.model.dir, settings.server.wal_dir):
        assert str(path) in made_dirs, f"{path} is not created for the runtime user"
    cmd = json.loads(next(rest for word, rest in inst if word == "CMD"))
    assert python_modules(cmd) == [ONLINE_MODULE]
    assert_modules_exist(cmd)
    exposed = {int(p) for word, rest in inst if word == "EXPOSE" for p in rest.split()}
    s = settings.server
    assert {s.port, s.admin_port, s.metrics_port} <= exposed
    ignored = (PROJECT_ROOT / ".dockerignore").read_text().split()
    assert {".venv", "var"} <= set(ignored)


# -- Kubernetes ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def k8s() -> dict[str, Any]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs = []
    for resource in kustomization["resources"]:
        docs += [d for d in yaml.safe_load_all((K8S / resource).read_text()) if d]
    by_kind: dict[str, dict[str, Any]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
    secrets: dict[str, set[str]] = {}
    for gen in kustomization.get("secretGenerator", []):
        keys = set()
        for envs in gen.get("envs", []):
            example = K8S / f"{envs}.example"
            keys |= {ln.split("=", 1)[0] for ln in example.read_text().splitlines()
                     if ln.strip() and not ln.startswith("#")}
        secrets[gen["name"]] = keys
    return {"kinds": by_kind, "secrets": secrets, "kustomization": kustomization}


def workloads(k8s: Mapping[str, Any]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    for kind in ("StatefulSet", "Deployment"):
        for name, obj in k8s["kinds"].get(kind, {}).items():
            yield kind, name, obj


def pod_containers(obj: Mapping[str, Any]) -> list[dict[str, Any]]:
    spec = obj["spec"]["template"]["spec"]
    return list(spec.get("initContainers", [])) + list(spec["containers"])


def container_env(k8s: Mapping[str, Any], kind: str, name: str,
                  container: Mapping[str, Any]) -> dict[str, str]:
    """The container's environment as Kubernetes would set it (a secret -> a sample value,
    the pod name -> the first replica's name)."""
    env: dict[str, str] = {}
    for ref in container.get("envFrom", []):
        cm = k8s["kinds"]["ConfigMap"][ref["configMapRef"]["name"]]
        env.update({k: str(v) for k, v in cm["data"].items()})
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
            continue
        source = item["valueFrom"]
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            assert ref["key"] in k8s["secrets"][ref["name"]], f"{name}: no secret key {ref}"
            env[item["name"]] = f"sample-{ref['key']}"
        else:
            assert source["fieldRef"]["fieldPath"] == "metadata.name", item
            env[item["name"]] = f"{name}-0" if kind == "StatefulSet" else f"{name}-5d8c9-x2x7q"
    return env


def online_statefulset(k8s: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    found = [(n, o) for kind, n, o in workloads(k8s)
             if any(ONLINE_MODULE in python_modules(c.get("command", []))
                    for c in pod_containers(o))]
    assert len(found) == 1 and found[0][1]["kind"] == "StatefulSet", \
        "the replicas are one StatefulSet (a WAL volume and a stable node id per replica)"
    return found[0]


def test_k8s_variables_are_config_keys_and_secrets_exist(k8s: dict[str, Any]) -> None:
    for kind, name, obj in workloads(k8s):
        for c in pod_containers(obj):
            try:
                settings_from(container_env(k8s, kind, name, c))
            except Exception as exc:  # noqa: BLE001 - say which container
                pytest.fail(f"{kind} {name}, container {c['name']}: {exc}")


def test_k8s_online_replicas_probe_grpc_health_and_keep_their_wal(k8s: dict[str, Any]) -> None:
    name, sts = online_statefulset(k8s)
    (server,) = sts["spec"]["template"]["spec"]["containers"]
    env = container_env(k8s, "StatefulSet", name, server)
    settings = settings_from(env)
    s = settings.server
    assert s.host == "0.0.0.0"
    node_source = next(e for e in server["env"] if e["name"] == "LAMBDAREC__SERVER__NODE_ID")
    assert node_source["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    for i in range(sts["spec"]["replicas"]):
        check_node_id(f"{name}-{i}")
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports == {"grpc": s.port, "admin": s.admin_port, "metrics": s.metrics_port}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["grpc"]["port"] == s.port, probe
    for probe in ("startupProbe", "readinessProbe"):
        assert server[probe]["grpc"]["service"] == RECOMMENDER, probe
    mounts = {m["mountPath"]: m["name"] for m in server["volumeMounts"]}
    (wal_mount,) = [m for m in mounts if is_under(s.wal_dir, m)]
    templates = {t["metadata"]["name"]: t for t in sts["spec"]["volumeClaimTemplates"]}
    assert mounts[wal_mount] in templates, "the WAL is each replica's own claim"
    (data_mount,) = [m for m in mounts if is_under(settings.lake.root, m)]
    assert is_under(settings.model.dir, data_mount)
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    claim = volumes[mounts[data_mount]]["persistentVolumeClaim"]["claimName"]
    pvc = k8s["kinds"]["PersistentVolumeClaim"][claim]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], "every replica writes the lake"
    # graceful stop: the server drains for server.flush_interval_s, then flushes the WAL
    assert sts["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > \
        2 * s.flush_interval_s


def test_k8s_services_select_pods_and_name_their_ports(k8s: dict[str, Any]) -> None:
    pods = {}
    for _kind, name, obj in workloads(k8s):
        tmpl = obj["spec"]["template"]
        names = {p["name"]: p["containerPort"] for c in tmpl["spec"]["containers"]
                 for p in c.get("ports", [])}
        pods[name] = (tmpl["metadata"]["labels"], names)
    for name, svc in k8s["kinds"]["Service"].items():
        selector = svc["spec"]["selector"]
        matched = [n for n, (labels, _) in pods.items() if selector.items() <= labels.items()]
        assert len(matched) == 1, f"Service {name} selects {matched}"
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in pods[matched[0]][1], f"{name}: {port}"
            assert port["port"] == pods[matched[0]][1][port["targetPort"]], f"{name}: {port}"
    sts_name, sts = online_statefulset(k8s)
    public = [svc for svc in k8s["kinds"]["Service"].values()
              if svc["spec"].get("clusterIP") != "None"
              and svc["spec"]["selector"] == sts["spec"]["selector"]["matchLabels"]]
    server_port = settings_from(container_env(
        k8s, "StatefulSet", sts_name, sts["spec"]["template"]["spec"]["containers"][0])
    ).server.port
    assert [[p["port"] for p in svc["spec"]["ports"]] for svc in public] == [[server_port]]
    headless = k8s["kinds"]["Service"][sts["spec"]["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None"


def test_k8s_batch_side_reaches_every_replica_and_the_lake(k8s: dict[str, Any]) -> None:
    sts_name, sts = online_statefulset(k8s)
    server = sts["spec"]["template"]["spec"]["containers"][0]
    online = settings_from(container_env(k8s, "StatefulSet", sts_name, server))
    expected = [f"{sts_name}-{i}.{sts['spec']['serviceName']}:{online.server.admin_port}"
                for i in range(sts["spec"]["replicas"])]
    airflow = [(n, o) for kind, n, o in workloads(k8s)
               if any(c.get("command", [""])[0] == "airflow" for c in pod_containers(o))]
    assert len(airflow) == 1
    name, deployment = airflow[0]
    roles = {c["command"][1] for c in pod_containers(deployment)}
    assert {"db", "api-server", "scheduler", "dag-processor"} <= roles
    for c in pod_containers(deployment):
        env = container_env(k8s, "Deployment", name, c)
        settings = settings_from(env)
        assert settings.airflow.reload_targets == expected, c["name"]
        assert settings.lake.root == online.lake.root and settings.model.dir == online.model.dir
        assert settings.server.admin_token == online.server.admin_token  # the same secret
        assert_spark_connection(env, settings)
        mounts = [m["mountPath"] for m in c["volumeMounts"]]
        assert any(is_under(settings.lake.root, m) for m in mounts), c["name"]
        assert any(is_under(env["AIRFLOW_HOME"], m) for m in mounts), c["name"]


def test_k8s_commands_exist(k8s: dict[str, Any]) -> None:
    commands, env = [], {}
    for kind, name, obj in workloads(k8s):
        for c in pod_containers(obj):
            assert c["image"].split(":")[0] in {i["name"] for i in
                                                k8s["kustomization"]["images"]}
            assert_modules_exist(c["command"])
            if c["command"][0] == "airflow":
                commands.append(c["command"])
                env.update(container_env(k8s, kind, name, c))
    api = next(c for c in commands if c[1] == "api-server")
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == \
        f"http://localhost:{api[api.index('--port') + 1]}/execution/"
    assert airflow_problems(commands, env) == []


def test_secrets_file_is_not_committed() -> None:
    assert "infra/k8s/secrets.env" in (PROJECT_ROOT / ".gitignore").read_text().split()


# -- optional Redis overlays (the fleet's shared channel) -----------------------------------
def test_compose_fleet_overlay_joins_every_replica_to_redis(compose: dict[str, Any]) -> None:
    overlay = yaml.safe_load(COMPOSE_FLEET.read_text())
    assert set(overlay["services"]) - set(compose["services"]) == {"redis", "front-door"}
    urls = set()
    for name, service in online_services(compose).items():
        extra = overlay["services"][name]  # compose merges it into the base service
        settings = settings_from({**compose_env(service), **compose_env(extra)})
        urls.add(settings.fleet.redis_url)
        assert extra["depends_on"]["redis"]["condition"] == "service_healthy", name
    (url,) = urls
    parsed = urlparse(url)
    assert (parsed.scheme, parsed.hostname, parsed.port) == ("redis", "redis", 6379), url
    assert overlay["services"]["redis"]["image"].startswith("redis:7")


def test_k8s_fleet_overlay_joins_every_replica_to_the_redis_service(
        k8s: dict[str, Any]) -> None:
    kustomization = yaml.safe_load((K8S_FLEET / "kustomization.yaml").read_text())
    assert "../" in kustomization["resources"]
    docs = {d["kind"]: d for r in kustomization["resources"] if r != "../"
            for d in yaml.safe_load_all((K8S_FLEET / r).read_text()) if d}
    (patch_file,) = [p["path"] for p in kustomization["patches"]]
    patch = yaml.safe_load((K8S_FLEET / patch_file).read_text())
    sts_name, sts = online_statefulset(k8s)
    assert (patch["kind"], patch["metadata"]["name"]) == ("StatefulSet", sts_name)
    (server,) = sts["spec"]["template"]["spec"]["containers"]
    (patched,) = patch["spec"]["template"]["spec"]["containers"]
    assert patched["name"] == server["name"]  # strategic merge by container name
    env = container_env(k8s, "StatefulSet", sts_name,
                        {**server, "env": server["env"] + patched["env"]})
    url = urlparse(settings_from(env).fleet.redis_url)
    service, deployment = docs["Service"], docs["Deployment"]
    assert (url.scheme, url.hostname) == ("redis", service["metadata"]["name"])
    (port,) = service["spec"]["ports"]
    assert url.port == port["port"]
    pod = deployment["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    container_ports = {p["name"]: p["containerPort"]
                       for c in pod["spec"]["containers"] for p in c["ports"]}
    assert container_ports[port["targetPort"]] == port["port"]


def compose_haproxy(compose: Mapping[str, Any], bind_port: int, bind_admin: int) -> str:
    """The front door's configuration for the compose replicas (`online.fleet`'s, with
    the replicas by service name through Docker's DNS)."""
    from online.fleet import render_haproxy

    replicas = []
    for name, service in sorted(online_services(compose).items()):
        s = settings_from(compose_env(service)).server
        replicas.append((f"{name}:{s.port}", f"{name}:{s.admin_port}", s.metrics_port))
    return render_haproxy("0.0.0.0", bind_port, bind_admin, replicas, dns=DOCKER_DNS,
                          written_by="tests/test_deploy.py from infra/docker-compose.yml")


def test_compose_front_door_balances_every_replica_on_its_health(
        compose: dict[str, Any]) -> None:
    """The overlay's HAProxy: its configuration is `online.fleet`'s for the compose
    replicas (regenerate with `compose_haproxy` when they change), HAProxy accepts it, and
    its published ports reach the frontends it binds."""
    import shutil

    overlay = yaml.safe_load(COMPOSE_FLEET.read_text())
    door = overlay["services"]["front-door"]
    assert door["image"].startswith("haproxy:2.6")
    (mount,) = door["volumes"]
    source, target = mount.split(":")[:2]
    assert (COMPOSE_FLEET.parent / source).resolve() == COMPOSE_HAPROXY
    assert target == "/usr/local/etc/haproxy/haproxy.cfg"
    published = dict(p.split(":") for p in door["ports"])
    binds = [int(p) for p in re.findall(r"^\s+bind 0\.0\.0\.0:(\d+) proto h2$",
                                        COMPOSE_HAPROXY.read_text(), re.M)]
    assert sorted(int(p) for p in published.values()) == sorted(binds)
    text = COMPOSE_HAPROXY.read_text()
    assert text == compose_haproxy(compose, *binds), (
        f"{COMPOSE_HAPROXY} is stale: write compose_haproxy(...)'s text there")
    assert set(door["depends_on"]) == set(online_services(compose))
    for name in online_services(compose):
        # a stopping replica answers while the front door's checks move its calls away
        settings = settings_from({**compose_env(compose["services"][name]),
                                  **compose_env(overlay["services"][name])})
        assert settings.server.drain_s > 0, name
    haproxy = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin")
    if haproxy is None:
        pytest.skip("haproxy is installed by infra/scripts/ensure_system.sh")
    out = subprocess.run([haproxy, "-c", "-q", "-f", str(COMPOSE_HAPROXY)],
                         capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 0, out.stderr
