"""Writes the kube-prometheus-stack objects from the files they are made of, so they cannot drift:

- deploy/k8s/monitoring/prometheusrule.yaml: a PrometheusRule whose groups are
  deploy/prometheus/alerts.yml (the file promtool checks and unit-tests);
- deploy/k8s/monitoring/grafana-dashboard.yaml: a ConfigMap labelled grafana_dashboard="1" (the
  Grafana sidecar's default label) holding deploy/grafana/dashboards/inforeg-regulator.json.

    python deploy/generate.py           # (re)write them
    python deploy/generate.py --check   # exit 1 if a committed file is not what this writes

tests/test_deploy.py runs the check. Only the standard library and PyYAML are needed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

DEPLOY = Path(__file__).resolve().parent
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "inforeg-regulator.json"
OUT = DEPLOY / "k8s" / "monitoring"
NAME = "inforeg-regulator"
LABELS = {"app.kubernetes.io/name": NAME}


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (PromQL, the dashboard JSON) as literal blocks, as a person writes them."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def _header(source: Path) -> str:
    rel = source.relative_to(DEPLOY.parent)
    return f"# GENERATED from {rel} by `python deploy/generate.py`: edit that file, then rerun it.\n"


def _yaml(doc: dict[str, Any]) -> str:
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=150, allow_unicode=True)


def prometheus_rule() -> str:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    doc = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": NAME, "labels": dict(LABELS)},
        "spec": {"groups": groups},
    }
    return _header(ALERTS) + _yaml(doc)


def dashboard_configmap() -> str:
    text = DASHBOARD.read_text()
    json.loads(text)  # a broken dashboard must not be shipped
    doc = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": f"{NAME}-dashboard",
            # kube-prometheus-stack's Grafana sidecar loads ConfigMaps with this label; the
            # annotation names the folder when the sidecar's folderAnnotation is grafana_folder.
            "labels": {**LABELS, "grafana_dashboard": "1"},
            "annotations": {"grafana_folder": "InfoReg"},
        },
        "data": {DASHBOARD.name: text},
    }
    return _header(DASHBOARD) + _yaml(doc)


def outputs() -> dict[Path, str]:
    return {OUT / "prometheusrule.yaml": prometheus_rule(), OUT / "grafana-dashboard.yaml": dashboard_configmap()}


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(DEPLOY.parent))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file is out of date")
    args = p.parse_args(argv)
    stale = []
    for path, text in outputs().items():
        current = path.read_text() if path.exists() else None
        if current == text:
            continue
        stale.append(path)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {_shown(path)}")
    if args.check and stale:
        names = ", ".join(_shown(s) for s in stale)
        print(f"out of date: {names}; run `python deploy/generate.py`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
