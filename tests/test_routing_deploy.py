"""deploy/ for several replicas, checked offline: overlays/central-ha (+ components/cnpg) and
deploy/envoy/envoy.yaml.

The overlay renders and its core documents pass kubernetes-validate (tests/test_deploy.py, which
lists it); here: the replicas, their spreading and disruption budget, the headless Service the
client library routes over, the store URL from a Secret, and the same server flags and probes as
the single-replica overlay. The CloudNativePG `Cluster` is a CRD, checked by hand. Envoy's file is
checked for its structure only: no envoy binary can be installed here (neither Debian nor PyPI
ships one), so ``envoy --mode validate`` runs only where one is on PATH.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from regulator_client.routing import JOB_HEADER
from regulator_service.edge.server import LIVENESS_NAME, SERVICE_NAME

from .test_deploy import (
    DEPLOY,
    K8S,
    TOKEN_SECRET,
    _labels_match,
    assert_secret_file,
    container_env,
    find,
    kustomize,
    port_number,
    regulator_pods,
    rendered,
    serve_args,
    validate_strict,
)

HA = "overlays/central-ha"
ENVOY = DEPLOY / "envoy" / "envoy.yaml"
STORE_SECRET = ("inforeg-regulator-store", "uri")
DSN = "postgresql://regulator@pg.example:5432/regulator"


def store_env(reg: dict[str, Any]) -> tuple[str, str]:
    """(Secret, key) REGULATOR_STORE comes from."""
    (var,) = [v for v in reg.get("env", []) if v["name"] == "REGULATOR_STORE"]
    ref = var["valueFrom"]["secretKeyRef"]
    return ref["name"], ref["key"]


def pods_of(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    (pod,) = regulator_pods(docs)
    return pod


def headless(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (svc,) = [d for d in docs if d["kind"] == "Service" and d["spec"].get("clusterIP") == "None"]
    return svc


def test_central_ha_runs_replicas_on_a_store_from_a_secret() -> None:
    docs = rendered(HA)
    workload, spec, reg = pods_of(docs)
    labels = workload["spec"]["template"]["metadata"]["labels"]
    assert workload["kind"] == "Deployment" and workload["spec"]["replicas"] >= 2
    assert workload["spec"]["strategy"]["type"] == "RollingUpdate"  # no volume to hand over
    assert not any("persistentVolumeClaim" in v for v in spec["volumes"])

    # The server's flags: the store from the Secret (a literal here, as the kubelet would put it).
    assert store_env(reg) == STORE_SECRET
    args = serve_args([str(a) for a in reg["args"]], {**container_env(docs, reg), "REGULATOR_STORE": DSN})
    assert args.store == DSN and not args.in_memory
    assert "--state-dir" not in " ".join(reg["args"])
    assert args.host == "0.0.0.0" and port_number(reg["ports"], "grpc") == args.port
    for kind, name in (("startupProbe", LIVENESS_NAME), ("readinessProbe", SERVICE_NAME), ("livenessProbe", LIVENESS_NAME)):
        assert reg[kind]["grpc"] == {"port": args.health_port, "service": name}, kind
    assert_secret_file(spec, reg, args.token_file, TOKEN_SECRET)
    assert reg["securityContext"]["readOnlyRootFilesystem"] is True and spec["enableServiceLinks"] is False

    # Spread: one replica per node; voluntary disruptions take one at a time.
    (term,) = spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert _labels_match(term["labelSelector"]["matchLabels"], labels)
    pdb = find(docs, "PodDisruptionBudget")
    assert _labels_match(pdb["spec"]["selector"]["matchLabels"], labels)
    assert pdb["spec"]["maxUnavailable"] == 1 < workload["spec"]["replicas"]

    # The headless Service the client library routes over: every ready replica's address.
    svc = headless(docs)
    assert _labels_match(svc["spec"]["selector"], labels) and svc["spec"]["publishNotReadyAddresses"] is False
    (grpc_port,) = svc["spec"]["ports"]
    assert grpc_port["port"] == args.port and port_number(reg["ports"], grpc_port["targetPort"]) == args.port
    # Prometheus scrapes through the other Service only (not each replica twice).
    sm = find(docs, "ServiceMonitor")
    assert not _labels_match(sm["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"])


def test_cnpg_component_gives_the_replicas_the_operators_database(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": [os.path.relpath(K8S / HA, tmp_path)],
        "components": [os.path.relpath(K8S / "components" / "cnpg", tmp_path)],
    }))
    docs = kustomize(tmp_path, "--load-restrictor", "LoadRestrictionsNone")
    cluster = find(docs, "Cluster")
    # The CRD by hand (CloudNativePG's postgresql.cnpg.io/v1 Cluster): what the replicas rely on.
    assert cluster["apiVersion"] == "postgresql.cnpg.io/v1"
    assert set(cluster["spec"]) <= {"instances", "affinity", "bootstrap", "storage", "resources", "postgresql", "imageName"}
    assert cluster["spec"]["instances"] >= 2  # a standby to fail over to
    assert set(cluster["spec"]["bootstrap"]) == {"initdb"} and cluster["spec"]["bootstrap"]["initdb"]["database"]
    assert cluster["metadata"]["labels"]["app.kubernetes.io/part-of"] == "inforeg"
    _, _, reg = pods_of(docs)
    # the operator's app Secret: <cluster>-app, with the read-write Service's URL under `uri`
    assert store_env(reg) == (f"{cluster['metadata']['name']}-app", "uri")
    validate_strict(docs, tmp_path)


def envoy() -> dict[str, Any]:
    return yaml.safe_load(ENVOY.read_text())


def test_envoy_routes_each_job_to_one_healthy_replica() -> None:
    config = envoy()
    (listener,) = config["static_resources"]["listeners"]
    (chain,) = listener["filter_chains"]
    (hcm,) = chain["filters"]
    hcm = hcm["typed_config"]
    assert hcm["codec_type"] == "HTTP2" and listener["address"]["socket_address"]["port_value"] == 50051
    (vhost,) = hcm["route_config"]["virtual_hosts"]
    (route,) = vhost["routes"]
    action = route["route"]
    assert action["hash_policy"] == [{"header": {"header_name": JOB_HEADER}, "terminal": True}]
    assert action["timeout"] == "0s"  # the client's deadline bounds a call, not Envoy's 15 s default
    assert hcm["http_filters"][-1]["name"] == "envoy.filters.http.router"

    (cluster,) = config["static_resources"]["clusters"]
    assert cluster["name"] == action["cluster"] and cluster["lb_policy"] == "RING_HASH"
    upstream = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http2_protocol_options" in upstream["explicit_http_config"]  # gRPC needs HTTP/2 upstream
    (check,) = cluster["health_checks"]
    assert check["grpc_health_check"]["service_name"] == SERVICE_NAME  # readiness: the store works

    # The replicas: the central-ha overlay's headless Service, its gRPC port; health on theirs.
    (group,) = cluster["load_assignment"]["endpoints"]
    (ep,) = group["lb_endpoints"]
    address = ep["endpoint"]["address"]["socket_address"]
    docs = rendered(HA)
    _, _, reg = pods_of(docs)
    args = serve_args([str(a) for a in reg["args"]], {**container_env(docs, reg), "REGULATOR_STORE": DSN})
    assert cluster["type"] == "STRICT_DNS" and address["address"] == headless(docs)["metadata"]["name"]
    assert address["port_value"] == args.port and ep["endpoint"]["health_check_config"]["port_value"] == args.health_port


def test_envoy_validates_where_an_envoy_binary_exists(tmp_path: Path) -> None:
    binary = shutil.which("envoy")
    if binary is None:
        pytest.skip("no envoy binary here (neither Debian nor PyPI ships one): structure checked above only")
    proc = subprocess.run([binary, "--mode", "validate", "-c", str(ENVOY)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
