"""deploy/: the Kubernetes manifests, the Prometheus files and the Dockerfile, checked offline.

- every kustomization renders (`kubectl kustomize`), and every rendered core document passes
  `kubernetes-validate -k 1.29.0 --strict`; the prometheus-operator CRDs (PodMonitor,
  ServiceMonitor) are not in its schemas and are checked here by hand;
- the manifests agree with the server's real command line: the container args and the
  REGULATOR_* settings parse with ``regulator_cli.main.build_parser``, the probes use the
  configured health port, the Service/PodMonitor/ServiceMonitor the configured metrics port;
- yamllint over deploy/; promtool on the scrape config, the alert rules and their unit tests,
  and on every dashboard query (as recording rules: promtool parses PromQL);
- the Dockerfile, parsed statically (no Docker engine here), and its HEALTHCHECK command run
  against a real `regulator serve` started with the image's CMD.
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path, PurePosixPath
from typing import Any, Iterator, Optional

import grpc
import pytest
import yaml

from regulator_cli.main import build_parser
from regulator_service.server import SERVICE_NAME

from .conftest import require_promtool

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
PROM = DEPLOY / "prometheus"
DOCKERFILE = DEPLOY / "Dockerfile"

K8S_VERSION = "1.29.0"
SCRAPE_JOB = "inforeg-regulator"  # the job label every scrape path sets (alerts and dashboard filter on it)
TOKEN_SECRET = "inforeg-regulator-token"
ENV_PREFIX = "REGULATOR_"
# prometheus-operator CRDs: not in kubernetes-validate's schemas.
CRDS = {("monitoring.coreos.com/v1", "PodMonitor"), ("monitoring.coreos.com/v1", "ServiceMonitor")}

KUSTOMIZATIONS = {
    "overlays/sidecar": {"ServiceAccount", "ConfigMap", "Job", "PodMonitor"},
    "overlays/central": {"ServiceAccount", "ConfigMap", "PersistentVolumeClaim", "Deployment", "Service", "ServiceMonitor"},
    "overlays/central-mtls": {"ServiceAccount", "ConfigMap", "PersistentVolumeClaim", "Deployment", "Service", "ServiceMonitor"},
    "examples/central-trainer": {"Job"},
}
REGULATOR_OVERLAYS = ("overlays/sidecar", "overlays/central", "overlays/central-mtls")


# -- tools ------------------------------------------------------------------------------------


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.skip("kubectl is not on PATH: the Kubernetes manifests cannot be rendered (kubectl kustomize) here")
    return path


def promtool() -> str:
    return require_promtool()


def venv_tool(name: str, package: str) -> str:
    """A console script of a dev dependency, next to this interpreter or on PATH."""
    local = Path(sys.executable).with_name(name)
    path = str(local) if local.exists() else shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: pip install {package}")
    return path


def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kw)


# -- rendered manifests ------------------------------------------------------------------------


_RENDERED: dict[str, list[dict[str, Any]]] = {}


def rendered(kustomization: str) -> list[dict[str, Any]]:
    if kustomization not in _RENDERED:
        proc = run([kubectl(), "kustomize", str(K8S / kustomization)])
        assert proc.returncode == 0, f"kubectl kustomize {kustomization} failed:\n{proc.stderr}"
        _RENDERED[kustomization] = [d for d in yaml.safe_load_all(proc.stdout) if d]
    return _RENDERED[kustomization]


def find(docs: list[dict[str, Any]], kind: str, name: Optional[str] = None) -> dict[str, Any]:
    hits = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(hits) == 1, f"expected one {kind} {name or ''}, found {len(hits)}"
    return hits[0]


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def regulator_pods(docs: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]]:
    """(workload, pod spec, regulator container) for every workload that runs a regulator."""
    for d in docs:
        if d["kind"] not in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
            continue
        spec = pod_spec(d)
        for c in spec.get("initContainers", []) + spec.get("containers", []):
            if c["name"] == "regulator":
                yield d, spec, c


def container_env(docs: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    """The container's environment from envFrom ConfigMaps and literal env values."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef")
        assert ref is not None, f"unexpected envFrom source {source}"
        cm = find(docs, "ConfigMap", ref["name"])  # kustomize rewrote the name to the hashed one
        env.update({k: str(v) for k, v in cm.get("data", {}).items()})
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = str(var["value"])
    return env


def serve_args(args: list[str], env: dict[str, str]) -> Any:
    """Parses `regulator serve ARGS` with ``env`` as the process environment, as the container would."""
    saved = dict(os.environ)
    err = io.StringIO()
    try:
        for key in [k for k in os.environ if k.startswith(ENV_PREFIX)]:
            del os.environ[key]
        os.environ.update(env)
        with redirect_stderr(err):
            return build_parser().parse_args(["serve", *args])  # REGULATOR_* defaults are read here
    except SystemExit:
        pytest.fail(f"`regulator serve {shlex.join(args)}` with {env} does not parse:\n{err.getvalue()}")
    finally:
        os.environ.clear()
        os.environ.update(saved)


def serve_options() -> dict[str, Any]:
    """Option string -> argparse action of `regulator serve`."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    serve = sub.choices["serve"]
    return {opt: action for action in serve._actions for opt in action.option_strings}


def flags_in(args: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in args if a.startswith("--")]


def port_number(ports: list[dict[str, Any]], name: str) -> int:
    hits = [p for p in ports if p.get("name") == name]
    assert len(hits) == 1, f"no port named {name!r} in {ports}"
    return hits[0]["containerPort"] if "containerPort" in hits[0] else hits[0]["port"]


def mount_for(container: dict[str, Any], path: str) -> dict[str, Any]:
    """The volumeMount that contains ``path`` (the longest mountPath prefix)."""
    p = PurePosixPath(path)
    mounts = [m for m in container.get("volumeMounts", []) if p == PurePosixPath(m["mountPath"]) or PurePosixPath(m["mountPath"]) in p.parents]
    assert mounts, f"{path} is on no volume of container {container['name']}"
    return max(mounts, key=lambda m: len(m["mountPath"]))


def volume(spec: dict[str, Any], name: str) -> dict[str, Any]:
    hits = [v for v in spec.get("volumes", []) if v["name"] == name]
    assert len(hits) == 1, f"volume {name} not defined"
    return hits[0]


def assert_secret_file(spec: dict[str, Any], container: dict[str, Any], path: str, secret: str) -> None:
    """``path`` is a file projected from Secret ``secret`` into ``container``."""
    mount = mount_for(container, path)
    assert mount.get("readOnly") is True, f"{mount} should be read-only"
    vol = volume(spec, mount["name"])
    assert "secret" in vol and vol["secret"]["secretName"] == secret, f"{path} is not from Secret {secret}: {vol}"
    rel = str(PurePosixPath(path).relative_to(mount["mountPath"]))
    items = vol["secret"].get("items")
    names = [i["path"] for i in items] if items else None
    if names is not None:
        assert rel in names, f"{path}: Secret {secret} projects only {names}"


# -- kustomize and kubernetes-validate ---------------------------------------------------------


@pytest.mark.parametrize("kustomization", sorted(KUSTOMIZATIONS))
def test_kustomize_renders(kustomization: str) -> None:
    docs = rendered(kustomization)
    assert {d["kind"] for d in docs} == KUSTOMIZATIONS[kustomization]
    for d in docs:
        assert d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "inforeg", d["metadata"]
        if "template" not in d.get("spec", {}):
            continue
        spec = pod_spec(d)
        for c in spec.get("initContainers", []) + spec["containers"]:
            assert re.fullmatch(r"[\w.-]+(/[\w.-]+)+:[\w.-]+", c["image"]), f"image {c['image']!r} not set by components/common"


@pytest.mark.parametrize("kustomization", sorted(KUSTOMIZATIONS))
def test_kubernetes_validate_strict(kustomization: str, tmp_path: Path) -> None:
    """Core documents against the 1.29 schemas, unknown fields rejected; CRDs: see test_operator_monitors."""
    validator = venv_tool("kubernetes-validate", "kubernetes-validate")
    files = []
    for i, d in enumerate(rendered(kustomization)):
        if (d["apiVersion"], d["kind"]) in CRDS:
            continue
        f = tmp_path / f"{i:02d}-{d['kind']}-{d['metadata']['name']}.yaml"
        f.write_text(yaml.safe_dump(d))
        files.append(str(f))
    assert files
    proc = run([validator, "-k", K8S_VERSION, "--strict", *files])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("passed for resource") == len(files), proc.stdout


def test_kubernetes_validate_is_strict(tmp_path: Path) -> None:
    """Control: the validator rejects an unknown field, so a pass means something."""
    validator = venv_tool("kubernetes-validate", "kubernetes-validate")
    job = json.loads(json.dumps(find(rendered("overlays/sidecar"), "Job")))
    pod_spec(job)["initContainers"][0]["restartPolicyy"] = "Always"
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(job))
    proc = run([validator, "-k", K8S_VERSION, "--strict", str(f)])
    assert proc.returncode != 0 and "restartPolicyy" in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def _labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _check_endpoint(ep: dict[str, Any], allowed: set[str]) -> None:
    assert set(ep) <= allowed, f"unexpected endpoint fields {set(ep) - allowed}"
    assert ep.get("path", "/metrics") == "/metrics"
    assert re.fullmatch(r"\d+[smh]", ep["interval"]), ep["interval"]
    # The job label the dashboard and alerts.yml filter on.
    assert {"action": "replace", "targetLabel": "job", "replacement": SCRAPE_JOB} in ep["relabelings"], ep


ENDPOINT_FIELDS = {"port", "path", "interval", "scrapeTimeout", "scheme", "relabelings", "metricRelabelings", "honorLabels"}


def test_operator_monitors() -> None:
    """PodMonitor/ServiceMonitor by hand (no schema): required fields, selector and port resolve."""
    # Sidecar: the PodMonitor selects the Job's pods and names the regulator's metrics port.
    docs = rendered("overlays/sidecar")
    pm = find(docs, "PodMonitor")
    assert pm["apiVersion"] == "monitoring.coreos.com/v1" and pm["metadata"]["name"]
    assert set(pm["spec"]) <= {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel", "podTargetLabels"}
    (workload, spec, reg), = regulator_pods(docs)
    assert _labels_match(pm["spec"]["selector"]["matchLabels"], workload["spec"]["template"]["metadata"]["labels"])
    (ep,) = pm["spec"]["podMetricsEndpoints"]
    _check_endpoint(ep, ENDPOINT_FIELDS)
    args = serve_args(reg.get("args", []), container_env(docs, reg))
    assert port_number(reg["ports"], ep["port"]) == args.metrics_port

    # Central: the ServiceMonitor selects the Service, whose metrics port leads to the container's.
    for overlay in ("overlays/central", "overlays/central-mtls"):
        docs = rendered(overlay)
        sm = find(docs, "ServiceMonitor")
        svc = find(docs, "Service")
        assert sm["apiVersion"] == "monitoring.coreos.com/v1" and sm["metadata"]["name"]
        assert set(sm["spec"]) <= {"selector", "endpoints", "namespaceSelector", "jobLabel", "targetLabels"}
        assert _labels_match(sm["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"])
        (ep,) = sm["spec"]["endpoints"]
        _check_endpoint(ep, ENDPOINT_FIELDS)
        (workload, spec, reg), = regulator_pods(docs)
        args = serve_args(reg.get("args", []), container_env(docs, reg))
        (sport,) = [p for p in svc["spec"]["ports"] if p["name"] == ep["port"]]
        assert port_number(reg["ports"], sport["targetPort"]) == args.metrics_port


# -- the manifests against the server's real flags ---------------------------------------------


@pytest.mark.parametrize("overlay", REGULATOR_OVERLAYS)
def test_manifests_match_server_flags(overlay: str) -> None:
    docs = rendered(overlay)
    pods = list(regulator_pods(docs))
    assert len(pods) == 1, f"{overlay}: expected one regulator container, found {len(pods)}"
    workload, spec, reg = pods[0]
    options = serve_options()
    args_list = [str(a) for a in reg.get("args", [])]
    assert not reg.get("command"), "the image's ENTRYPOINT (regulator serve) must stay in charge"

    # Every flag in the manifest exists; every REGULATOR_* setting names a flag of `regulator serve`.
    unknown = [f for f in flags_in(args_list) if f not in options]
    assert not unknown, f"{overlay}: `regulator serve` has no {unknown}"
    env = container_env(docs, reg)
    dests = {a.dest for a in options.values()}
    for key in (k for k in env if k.startswith(ENV_PREFIX)):
        assert key[len(ENV_PREFIX):].lower() in dests, f"{overlay}: {key} matches no `regulator serve` flag"
    args = serve_args(args_list, env)
    # ... and each setting takes effect as its flag would.
    for key, value in env.items():
        if key.startswith(ENV_PREFIX):
            dest = key[len(ENV_PREFIX):].lower()
            flag = next(o for o, a in options.items() if a.dest == dest and o.startswith("--"))
            explicit = serve_args([flag, value], {})
            assert getattr(args, dest) == getattr(explicit, dest), f"{key}={value} does not act like {flag} {value}"

    # Listening: the kubelet dials the pod IP, so gRPC, health and metrics listen on every address.
    assert args.host == "0.0.0.0" and (args.metrics_host or args.host) == "0.0.0.0"
    assert args.health_port > 0 and args.metrics_port > 0 and args.port > 0
    assert len({args.port, args.health_port, args.metrics_port}) == 3
    assert port_number(reg["ports"], "grpc") == args.port
    assert port_number(reg["ports"], "health") == args.health_port
    assert port_number(reg["ports"], "metrics") == args.metrics_port

    # Probes: gRPC on the plaintext health port, asking for the Regulator service.
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = reg.get(kind)
        assert probe is not None, f"{overlay}: no {kind}"
        assert set(probe) & {"httpGet", "tcpSocket", "exec"} == set(), probe
        assert probe["grpc"] == {"port": args.health_port, "service": SERVICE_NAME}, f"{kind}: {probe['grpc']}"
    live = reg["livenessProbe"]
    assert live.get("failureThreshold", 3) * live.get("periodSeconds", 10) >= 60, "liveness should be lenient"
    start = reg["startupProbe"]
    assert start.get("failureThreshold", 3) * start.get("periodSeconds", 10) >= 30

    # Security and resources.
    pod_sc, sc = spec.get("securityContext", {}), reg.get("securityContext", {})
    assert pod_sc.get("runAsNonRoot", sc.get("runAsNonRoot")) is True
    assert (sc.get("runAsUser") or pod_sc.get("runAsUser")) not in (None, 0)
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    res = reg["resources"]
    for section in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(res[section]), f"regulator {section}: {res.get(section)}"
    assert not any("gpu" in r for section in res.values() for r in section), "no GPU for the regulator"
    assert spec.get("enableServiceLinks") is False, (
        "enableServiceLinks must be false: a Service named 'regulator' injects REGULATOR_PORT=tcp://..., "
        "which `regulator serve` would read as --port"
    )
    assert spec["terminationGracePeriodSeconds"] > args.grace
    assert spec.get("automountServiceAccountToken") is False

    # The state directory is writable (the root filesystem is not); so is /tmp.
    state = mount_for(reg, str(args.state_dir))
    assert not state.get("readOnly"), state
    assert not mount_for(reg, "/tmp").get("readOnly")
    state_vol = volume(spec, state["name"])

    # The token comes from the Secret; TLS material (if any) from a Secret too.
    assert args.token_file, f"{overlay}: no token file configured"
    assert_secret_file(spec, reg, args.token_file, TOKEN_SECRET)
    for path in (args.tls_cert, args.tls_key, args.tls_client_ca):
        if path:
            assert_secret_file(spec, reg, path, "inforeg-regulator-tls")

    if overlay == "overlays/sidecar":
        _check_sidecar(docs, workload, spec, reg, args, state_vol)
    else:
        _check_central(docs, workload, spec, args, state_vol, mtls=overlay.endswith("mtls"))


def _check_trainer(spec: dict[str, Any], trainer: dict[str, Any], token_file: str) -> dict[str, Any]:
    assert trainer["resources"]["limits"].get("nvidia.com/gpu") == 1, "the trainer gets the GPU, under limits"
    assert "nvidia.com/gpu" not in trainer["resources"].get("requests", {})
    env = {v["name"]: v for v in trainer["env"]}
    assert env["REGULATOR_TOKEN_FILE"]["value"] == token_file
    assert_secret_file(spec, trainer, token_file, TOKEN_SECRET)
    assert env["REGULATOR_JOB_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['batch.kubernetes.io/job-name']"
    # Kubernetes expands $(VAR) in args only for variables defined in env.
    for ref in re.findall(r"\$\((\w+)\)", " ".join(trainer.get("args", []))):
        assert ref in env, f"trainer args use $({ref}), which is not in its env"
    return env


def _check_sidecar(docs: list[dict[str, Any]], job: dict[str, Any], spec: dict[str, Any], reg: dict[str, Any], args: Any, state_vol: dict[str, Any]) -> None:
    assert job["kind"] == "Job"
    assert reg in spec.get("initContainers", []) and reg.get("restartPolicy") == "Always", "native sidecar"
    assert "emptyDir" in state_vol
    (trainer,) = spec["containers"]
    env = _check_trainer(spec, trainer, args.token_file)
    assert env["REGULATOR_TARGET"]["value"] == f"127.0.0.1:{args.port}"


def _check_central(docs: list[dict[str, Any]], deploy: dict[str, Any], spec: dict[str, Any], args: Any, state_vol: dict[str, Any], mtls: bool) -> None:
    assert deploy["kind"] == "Deployment"
    assert deploy["spec"]["replicas"] == 1, "one writer of the SQLite file"
    assert deploy["spec"]["strategy"] == {"type": "Recreate"}, "the old pod must let go of the state before the new one starts"
    claim = state_vol["persistentVolumeClaim"]["claimName"]
    pvc = find(docs, "PersistentVolumeClaim", claim)
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    reg = next(c for c in spec["containers"] if c["name"] == "regulator")
    svc = find(docs, "Service")
    assert _labels_match(svc["spec"]["selector"], deploy["spec"]["template"]["metadata"]["labels"])
    ports = {p["name"]: p for p in svc["spec"]["ports"]}
    assert set(ports) == {"grpc", "metrics"}, "the health port is for the kubelet only"
    assert port_number(reg["ports"], ports["grpc"]["targetPort"]) == args.port
    assert port_number(reg["ports"], ports["metrics"]["targetPort"]) == args.metrics_port
    assert ports["metrics"]["port"] == args.metrics_port and ports["grpc"]["port"] == args.port
    if mtls:
        assert args.tls_cert and args.tls_key and args.tls_client_ca, "the mTLS overlay must set all three TLS flags"
    else:
        assert not (args.tls_cert or args.tls_key or args.tls_client_ca)


def test_central_trainer_example_targets_the_service() -> None:
    central = rendered("overlays/central")
    svc = find(central, "Service")
    (_, _, reg), = regulator_pods(central)
    args = serve_args(reg.get("args", []), container_env(central, reg))
    job = find(rendered("examples/central-trainer"), "Job")
    spec = pod_spec(job)
    (trainer,) = spec["containers"]
    env = _check_trainer(spec, trainer, args.token_file)
    names = [v["name"] for v in trainer["env"]]
    assert names.index("POD_NAMESPACE") < names.index("REGULATOR_TARGET"), "$(POD_NAMESPACE) must be defined first"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    grpc_port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc")
    assert env["REGULATOR_TARGET"]["value"] == f"{svc['metadata']['name']}.$(POD_NAMESPACE).svc:{grpc_port}"


def test_trainer_args_are_digits_flags() -> None:
    """The example trainers' flags exist in `python -m trainers.digits`."""
    pytest.importorskip("torch", reason="the trainer CLI needs torch")
    from trainers import digits

    out = io.StringIO()
    with redirect_stdout(out), pytest.raises(SystemExit):
        digits.main(["--help"])
    known = set(re.findall(r"--[a-z][a-z0-9-]*", out.getvalue()))
    for docs in (rendered("overlays/sidecar"), rendered("examples/central-trainer")):
        trainer = next(c for c in pod_spec(find(docs, "Job"))["containers"] if c["name"] == "trainer")
        assert trainer["command"] == ["python", "-m", "trainers.digits"]
        missing = set(flags_in(trainer["args"])) - known
        assert not missing, f"trainers.digits has no {missing}"


# -- yamllint, promtool ------------------------------------------------------------------------


def test_yamllint() -> None:
    venv_tool("yamllint", "yamllint")
    proc = run([sys.executable, "-m", "yamllint", "--strict", "-c", str(DEPLOY / ".yamllint"), str(DEPLOY)])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_check_config_and_rules() -> None:
    tool = promtool()
    proc = run([tool, "check", "config", str(PROM / "prometheus.yml")])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = run([tool, "check", "rules", str(PROM / "alerts.yml")])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    names = {r["alert"] for g in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"] for r in g["rules"]}
    assert names == {
        "InfoRegRegulatorDown",
        "InfoRegRegulatorHighErrorRatio",
        "InfoRegStateStoreWriteFailures",
        "InfoRegStateStoreUnhealthy",
        "InfoRegMetricJobCapReached",
    }


def test_promtool_alert_unit_tests() -> None:
    """Each alert fires on its input series and stays quiet where it should (alerts_test.yml)."""
    proc = run([promtool(), "test", "rules", str(PROM / "alerts_test.yml")])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tested = {t["alertname"] for case in yaml.safe_load((PROM / "alerts_test.yml").read_text())["tests"] for t in case["alert_rule_test"]}
    alerts = {r["alert"] for g in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"] for r in g["rules"]}
    assert tested == alerts, f"alerts without a unit test: {alerts - tested}"


# Grafana's variables, replaced by values of the right kind so that the queries are plain PromQL.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h", "$instance": ".*", "$job": ".*", "$modality": ".*"}


def grafana_dashboard() -> dict[str, Any]:
    return json.loads((DEPLOY / "grafana" / "dashboards" / "inforeg-regulator.json").read_text())


def test_grafana_dashboard_structure() -> None:
    dash = grafana_dashboard()
    assert dash["uid"] == "inforeg-regulator" and dash["title"] and "__inputs" not in dash
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    for name, query in (
        ("job", r"label_values\(inforeg_regulator_epoch(\{.*\})?, job_id\)"),
        ("modality", r'label_values\(inforeg_regulator_window_open\{.*job_id=~"\$job".*\}, modality\)'),
    ):
        var = variables[name]
        assert var["type"] == "query" and var["multi"] is True and var["includeAll"] is True, name
        assert re.fullmatch(query, var["query"]["query"]) and var["definition"] == var["query"]["query"], var["query"]
        assert var["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    kinds = {}
    for p in dash["panels"]:
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"] and all(t["datasource"] == p["datasource"] for t in p["targets"]), p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        assert {"h", "w", "x", "y"} <= set(p["gridPos"]) and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        for t in p["targets"]:
            kinds.setdefault(p["type"], []).append(t["expr"])
            if "$job" in t["expr"] or "$modality" in t["expr"]:
                assert re.search(r'job_id=~"\$job"', t["expr"]), f"{p['title']}: $job must filter job_id with =~"
    # The panels the brief names: window state timeline, Fisher trace on a log scale, gRPC RED.
    assert any("inforeg_regulator_window_open" in e for e in kinds["state-timeline"])
    fisher = next(p for p in dash["panels"] if any("inforeg_regulator_fisher_trace" in t["expr"] for t in p.get("targets", [])))
    assert fisher["fieldConfig"]["defaults"]["custom"]["scaleDistribution"]["type"] == "log"
    exprs = " ".join(e for es in kinds.values() for e in es)
    for needle in ("grpc_server_handled_total", "grpc_server_handling_seconds_bucket", "histogram_quantile(0.5,", "histogram_quantile(0.99,"):
        assert needle in exprs, needle


def test_grafana_provisioning() -> None:
    prov = DEPLOY / "grafana" / "provisioning"
    (ds,) = yaml.safe_load((prov / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert ds["type"] == "prometheus" and ds["url"].startswith("http")
    (provider,) = yaml.safe_load((prov / "dashboards" / "inforeg.yaml").read_text())["providers"]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/")


def test_dashboard_promql_parses(tmp_path: Path) -> None:
    """promtool parses every dashboard query (as recording rules, Grafana variables filled in)."""
    rules = []
    for p in grafana_dashboard()["panels"]:
        for t in p.get("targets", []):
            expr = t["expr"]
            for var, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(var, value)
            assert "$" not in expr, f"unknown Grafana variable in {t['expr']}"
            rules.append({"record": f"dashboard:panel{p['id']}:{t['refId'].lower()}", "expr": expr})
    assert len(rules) > 20
    f = tmp_path / "dashboard_rules.yml"
    f.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = run([promtool(), "check", "rules", str(f)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Control: a broken expression is refused.
    f.write_text(yaml.safe_dump({"groups": [{"name": "d", "rules": [{"record": "d:x", "expr": "sum(rate(x[1m])"}]}]}))
    assert run([promtool(), "check", "rules", str(f)]).returncode != 0


def test_prometheus_scrape_config_matches_server_defaults() -> None:
    cfg = yaml.safe_load((PROM / "prometheus.yml").read_text())
    (job,) = cfg["scrape_configs"]
    assert job["job_name"] == SCRAPE_JOB and job.get("metrics_path", "/metrics") == "/metrics"
    (static,) = job["static_configs"]
    image = serve_args(dockerfile_cmd(), {})
    assert [t.rsplit(":", 1)[1] for t in static["targets"]] == [str(image.metrics_port)]


# -- Dockerfile ---------------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; comments dropped, continuation lines joined."""
    out: list[tuple[str, str]] = []
    buf = ""
    for line in text.splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):  # a comment inside a continued instruction
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    assert not buf, "dangling line continuation"
    return out


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    starts = [i for i, (k, _) in enumerate(instructions) if k == "FROM"]
    return instructions[starts[-1]:]


def exec_form(arg: str) -> list[str]:
    value = json.loads(arg)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), f"not exec form: {arg}"
    return value


def dockerfile_cmd() -> list[str]:
    final = final_stage(dockerfile_instructions(DOCKERFILE.read_text()))
    (cmd,) = [a for k, a in final if k == "CMD"]
    return exec_form(cmd)


def healthcheck_command() -> list[str]:
    final = final_stage(dockerfile_instructions(DOCKERFILE.read_text()))
    (hc,) = [a for k, a in final if k == "HEALTHCHECK"]
    assert " CMD " in f" {hc} ", hc
    options, _, cmd = hc.partition("CMD ")
    for opt in ("--interval=", "--timeout=", "--start-period="):
        assert opt in options, f"HEALTHCHECK without {opt}"
    return exec_form(cmd)


def test_dockerfile_static() -> None:
    text = DOCKERFILE.read_text()
    ins = dockerfile_instructions(text)
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for k, a in ins if k == "ARG" and "=" in a}
    froms = [a.split()[0] for k, a in ins if k == "FROM"]
    images = [args.get(f.strip("${}"), f) if f.startswith("$") else f for f in froms]
    assert images and all(re.fullmatch(r"python:3\.11-slim(-\w+)?", i) for i in images), images
    final = final_stage(ins)
    kinds = [k for k, _ in final]

    # Non-root, by number (Kubernetes' runAsNonRoot can only verify numeric users).
    users = [a for k, a in final if k == "USER"]
    assert users, "no USER in the final stage: the image would run as root"
    user = users[-1].split(":")[0]
    assert user.isdigit() and int(user) != 0, f"USER {users[-1]} should be a numeric non-root uid"
    assert kinds.index("USER") < kinds.index("ENTRYPOINT")

    # The project is pip-installed without extras: no torch in the server image.
    assert any(k == "RUN" and re.search(r"pip install\s+\.(\s|$)", a) for k, a in ins), "no `pip install .`"
    assert not any("torch" in a or ".[" in a for k, a in ins if k == "RUN"), "the server image needs no torch"

    (entrypoint,) = [a for k, a in final if k == "ENTRYPOINT"]
    assert exec_form(entrypoint) == ["regulator", "serve"]
    cmd = dockerfile_cmd()
    image = serve_args(cmd, {})  # the CMD defaults parse with the real `regulator serve`
    assert image.host == "0.0.0.0" and image.metrics_host == "0.0.0.0"
    assert image.health_port > 0
    exposed = {int(p.split("/")[0]) for k, a in final if k == "EXPOSE" for p in a.split()}
    assert exposed == {image.port, image.health_port, image.metrics_port}
    assert str(image.state_dir) in " ".join(a for k, a in final if k in ("VOLUME", "RUN"))

    # HEALTHCHECK: the health-only port of the CMD, the Regulator service.
    hc = healthcheck_command()
    assert hc[:2] == ["python", "-c"]
    compile(hc[2], "<HEALTHCHECK>", "exec")
    assert f"127.0.0.1:{image.health_port}" in hc[2] and SERVICE_NAME in hc[2]


@pytest.mark.parametrize("overlay", REGULATOR_OVERLAYS)
def test_image_and_manifests_agree_on_ports(overlay: str) -> None:
    image = serve_args(dockerfile_cmd(), {})
    docs = rendered(overlay)
    (_, _, reg), = regulator_pods(docs)
    k8s = serve_args(reg.get("args", []), container_env(docs, reg))
    assert (k8s.port, k8s.health_port, k8s.metrics_port, str(k8s.state_dir)) == (
        image.port, image.health_port, image.metrics_port, str(image.state_dir)
    )


def test_dockerfile_copies_what_pip_install_needs() -> None:
    """Every package directory of pyproject.toml is copied and not excluded by the .dockerignore."""
    ins = dockerfile_instructions(DOCKERFILE.read_text())
    copied = set()
    for k, a in ins:
        if k == "COPY" and "--from=" not in a:
            copied.update(PurePosixPath(p).parts[0] for p in a.split()[:-1])
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    dirs = {PurePosixPath(d).parts[0] for d in project["tool"]["setuptools"]["package-dir"].values()}
    needed = dirs | {"pyproject.toml", project["project"]["readme"]}
    assert needed <= copied, f"not copied: {needed - copied}"
    for name in copied:
        assert (ROOT / name).exists(), f"COPY {name}: no such path"
    ignore = [l.strip() for l in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines() if l.strip() and not l.startswith("#")]
    assert ignore[0] == "*", "the .dockerignore should exclude everything first, then re-include"
    reincluded = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert needed <= reincluded, f"excluded from the build context: {needed - reincluded}"


def _healthcheck(hc: list[str], port: int) -> int:
    code = hc[2].replace("127.0.0.1:50052", f"127.0.0.1:{port}")
    assert code != hc[2] or port == 50052
    return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30).returncode


def test_image_cmd_serves_health_port_and_healthcheck_passes(tmp_path: Path) -> None:
    """`regulator serve` with the image's CMD (ports 0, loopback, a temp state dir): the HEALTHCHECK
    command and the kubelet's probe request succeed on the health-only port, which serves nothing
    else; after SIGTERM the HEALTHCHECK fails."""
    overrides = {"--host": "127.0.0.1", "--metrics-host": "127.0.0.1", "--port": "0", "--health-port": "0", "--metrics-port": "0", "--state-dir": str(tmp_path / "state")}
    cmd = dockerfile_cmd()
    args = []
    it = iter(cmd)
    for token in it:
        flag = token.split("=", 1)[0]
        value = token.split("=", 1)[1] if "=" in token else next(it)
        args += [flag, overrides.get(flag, value)]
    ready = tmp_path / "ready.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "regulator_cli", "serve", *args, "--ready-file", str(ready)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert proc.poll() is None, f"regulator serve {shlex.join(args)} exited: {proc.communicate()[1]}"
            assert time.monotonic() < deadline, "regulator serve did not become ready"
            time.sleep(0.05)
        info = json.loads(ready.read_text())
        health_port = info.get("health_port")
        assert health_port, f"--ready-file has no health_port: {info}"
        assert health_port not in (info["port"], info["metrics_port"])
        hc = healthcheck_command()
        assert _healthcheck(hc, health_port) == 0

        from grpc_health.v1 import health_pb2, health_pb2_grpc

        from inforeg.regulator.v1 import regulator_pb2 as pb
        from inforeg.regulator.v1 import regulator_pb2_grpc as pb_grpc

        with grpc.insecure_channel(f"127.0.0.1:{health_port}") as ch:
            # What the kubelet's grpc probe sends: {port: health, service: Regulator}.
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as err:
                pb_grpc.RegulatorStub(ch).ListSessions(pb.ListSessionsRequest(), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED, "the health port must serve only grpc.health.v1"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert _healthcheck(hc, health_port) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
