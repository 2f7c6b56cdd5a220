"""deploy/k8s/components/sidecar on workloads written outside the repository (issue 18, item 1).

A user's own batch Job, Kubeflow PyTorchJob (Master and Worker) and JobSet, each with things of
its own (init containers, env, volumes, labels), rendered with the component by `kubectl
kustomize`: every pod template gets the regulator as a native sidecar, its volumes, the pod label
the PodMonitor selects, and REGULATOR_TARGET, REGULATOR_TOKEN_FILE and the token on every
training container, and keeps what it had. The settings the sidecar reads parse with the real
`regulator serve`; core kinds pass kubernetes-validate --strict (the custom resources have no
schema there and are checked here by hand).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from regulator_service.edge.server import LIVENESS_NAME, SERVICE_NAME

from .test_deploy import (
    K8S,
    TOKEN_SECRET,
    _labels_match,
    assert_secret_file,
    container_env,
    find,
    kubectl,
    mount_for,
    run,
    serve_args,
    validate_strict,
    volume,
)

COMPONENT = K8S / "components" / "sidecar"
COMMON = K8S / "components" / "common"

# What the user's pods already have, which the component must keep.
USER_POD: dict[str, Any] = {
    "metadata": {"labels": {"team": "vision"}},
    "spec": {
        "restartPolicy": "Never",
        "initContainers": [{"name": "fetch-data", "image": "busybox:1.36", "command": ["true"]}],
        "containers": [
            {"name": "trainer", "image": "digits-trainer", "command": ["python", "-m", "trainers.digits"],
             "env": [{"name": "SEED", "value": "3"}], "volumeMounts": [{"name": "data", "mountPath": "/data"}]},
            {"name": "log-shipper", "image": "busybox:1.36", "command": ["true"]},
        ],
        "volumes": [{"name": "data", "emptyDir": {}}],
    },
}


def pod(**overrides: Any) -> dict[str, Any]:
    out = yaml.safe_load(yaml.safe_dump(USER_POD))
    out["spec"].update(overrides)
    return out


def user_job() -> dict[str, Any]:
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "my-job"},
            "spec": {"backoffLimit": 2, "template": pod()}}


def user_pytorchjob(workers: bool = True) -> dict[str, Any]:
    template = pod(restartPolicy="OnFailure")
    for c in template["spec"]["containers"]:
        c["name"] = "pytorch" if c["name"] == "trainer" else c["name"]
    specs = {"Master": {"replicas": 1, "restartPolicy": "OnFailure", "template": template}}
    if workers:
        specs["Worker"] = {"replicas": 3, "restartPolicy": "OnFailure", "template": template}
    return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": {"name": "my-ptjob"},
            "spec": {"pytorchReplicaSpecs": specs}}


def user_jobset() -> dict[str, Any]:
    def rjob(name: str, n: int) -> dict[str, Any]:
        return {"name": name, "replicas": 1,
                "template": {"spec": {"completionMode": "Indexed", "completions": n, "parallelism": n, "template": pod()}}}
    return {"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet", "metadata": {"name": "my-jobset"},
            "spec": {"replicatedJobs": [rjob("leader", 1), rjob("workers", 2)]}}


def render(tmp_path: Path, workload: dict[str, Any] | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The user's kustomization: their workload(s), then the sidecar and common components."""
    app = tmp_path / "app"
    app.mkdir()
    (app / "workload.yaml").write_text(yaml.safe_dump_all(workload if isinstance(workload, list) else [workload]))
    (app / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": ["workload.yaml"],
        "components": [os.path.relpath(COMPONENT, app), os.path.relpath(COMMON, app)],
    }))
    proc = run([kubectl(), "kustomize", str(app)])
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def check_pod(docs: list[dict[str, Any]], template: dict[str, Any], training: set[str]) -> None:
    """One rendered pod template: the sidecar, its volumes and label; the training containers'
    settings; and everything the user's pod had."""
    spec = template["spec"]
    inits = {c["name"]: c for c in spec["initContainers"]}
    assert set(inits) == {"fetch-data", "regulator"}, "the user's init container is kept, the sidecar added once"
    reg = inits["regulator"]
    assert reg["restartPolicy"] == "Always", "a native sidecar"
    assert reg["image"].startswith("registry.example.com/inforeg/inforeg-regulator:"), "the image comes from components/common"
    args = serve_args(reg["args"], container_env(docs, reg))  # the hashed ConfigMap resolves
    assert args.host == "127.0.0.1" and args.state_dir
    assert reg["livenessProbe"]["grpc"]["service"] == reg["startupProbe"]["grpc"]["service"] == LIVENESS_NAME
    assert reg["readinessProbe"]["grpc"]["service"] == SERVICE_NAME
    assert "emptyDir" in volume(spec, mount_for(reg, str(args.state_dir))["name"])
    assert_secret_file(spec, reg, args.token_file, TOKEN_SECRET)

    assert {v["name"] for v in spec["volumes"]} >= {"data"}, "the user's volumes are kept"
    names = [v["name"] for v in spec["volumes"]]
    assert len(names) == len(set(names)), names
    containers = {c["name"]: c for c in spec["containers"]}
    assert set(containers) == training | {"log-shipper"}, "no container added or lost"
    for c in containers.values():
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["REGULATOR_TARGET"] == f"127.0.0.1:{args.port}"
        assert env["REGULATOR_TOKEN_FILE"] == args.token_file
        assert_secret_file(spec, c, args.token_file, TOKEN_SECRET)
    for name in training:
        trainer = containers[name]
        assert {"name": "SEED", "value": "3"} in trainer["env"], "the user's env is kept"
        assert mount_for(trainer, "/data/x")["name"] == "data", "the user's mounts are kept"

    labels = template["metadata"]["labels"]
    assert labels["team"] == "vision", "the user's labels are kept"
    pm = find(docs, "PodMonitor")
    assert _labels_match(pm["spec"]["selector"]["matchLabels"], labels), "the PodMonitor selects the pod"
    assert pm["metadata"]["labels"]["release"], "Prometheus selects the PodMonitor"


def test_component_on_a_batch_job(tmp_path: Path) -> None:
    docs = render(tmp_path, user_job())
    job = find(docs, "Job", "my-job")
    check_pod(docs, job["spec"]["template"], {"trainer"})
    assert job["spec"]["backoffLimit"] == 2
    assert not any(d["kind"] == "RegulatorSidecar" for d in docs), "the local template stays out of the output"
    validate_strict(docs, tmp_path)


def test_component_on_a_pytorchjob_master_and_workers(tmp_path: Path) -> None:
    docs = render(tmp_path, user_pytorchjob())
    specs = find(docs, "PyTorchJob", "my-ptjob")["spec"]["pytorchReplicaSpecs"]
    assert set(specs) == {"Master", "Worker"} and specs["Worker"]["replicas"] == 3
    for role in ("Master", "Worker"):
        check_pod(docs, specs[role]["template"], {"pytorch"})
    validate_strict(docs, tmp_path)  # the core documents (ConfigMap, ServiceAccount)


def test_component_on_a_jobset_every_replicated_job(tmp_path: Path) -> None:
    docs = render(tmp_path, user_jobset())
    rjobs = find(docs, "JobSet", "my-jobset")["spec"]["replicatedJobs"]
    assert [r["name"] for r in rjobs] == ["leader", "workers"]
    for r in rjobs:
        check_pod(docs, r["template"]["spec"]["template"], {"trainer"})
    validate_strict(docs, tmp_path)


def test_component_on_minimal_workloads_of_every_kind_at_once(tmp_path: Path) -> None:
    """Pod templates with nothing but a container (no labels, env, volumes or init containers)
    get everything created; one kustomization may hold all three kinds."""
    def minimal(name: str) -> dict[str, Any]:
        return {"spec": {"containers": [{"name": name, "image": "digits-trainer"}]}}

    docs = render(tmp_path, [
        {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "j"}, "spec": {"template": minimal("t")}},
        {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": {"name": "p"},
         "spec": {"pytorchReplicaSpecs": {role: {"replicas": 1, "template": minimal("pytorch")} for role in ("Master", "Worker")}}},
        {"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet", "metadata": {"name": "s"},
         "spec": {"replicatedJobs": [{"name": "r", "replicas": 1, "template": {"spec": {"template": minimal("t")}}}]}},
    ])
    templates = [find(docs, "Job", "j")["spec"]["template"], find(docs, "JobSet", "s")["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]]
    templates += list(find(docs, "PyTorchJob", "p")["spec"]["pytorchReplicaSpecs"][r]["template"] for r in ("Master", "Worker"))
    pm = find(docs, "PodMonitor")
    for t in templates:
        spec = t["spec"]
        assert [c["name"] for c in spec["initContainers"]] == ["regulator"]
        assert [v["name"] for v in spec["volumes"]] == ["inforeg-state", "inforeg-tmp", "inforeg-token", "inforeg-metrics-token"]
        (c,) = spec["containers"]
        assert [e["name"] for e in c["env"]] == ["REGULATOR_TARGET", "REGULATOR_TOKEN_FILE"]
        assert [m["name"] for m in c["volumeMounts"]] == ["inforeg-token"]
        assert _labels_match(pm["spec"]["selector"]["matchLabels"], t["metadata"]["labels"])
    validate_strict(docs, tmp_path)


def test_pytorchjob_without_workers_is_refused(tmp_path: Path) -> None:
    """The component patches Master and Worker; a Master-only job (use a Job) fails to render
    instead of rendering a broken Worker."""
    app = tmp_path / "app"
    with pytest.raises(AssertionError, match="Worker"):
        render(tmp_path, user_pytorchjob(workers=False))
    assert app.exists()


def test_rendered_job_passes_kubernetes_validate_and_a_broken_one_does_not(tmp_path: Path) -> None:
    """Control for validate_strict on what the component renders: an unknown field in the
    sidecar is refused."""
    docs = render(tmp_path, user_job())
    job = find(docs, "Job", "my-job")
    reg = next(c for c in job["spec"]["template"]["spec"]["initContainers"] if c["name"] == "regulator")
    reg["restartPolicyy"] = "Always"
    with pytest.raises(AssertionError, match="restartPolicyy"):
        validate_strict([job], tmp_path)
