"""Render the alert rules and the dashboard as Kubernetes objects for deploy/k8s (committed).

    python deploy/monitoring/render_k8s.py          write them into the monitoring component
    python deploy/monitoring/render_k8s.py --check  exit 1, naming the stale files, if a
                                                    fresh render differs from the committed one

kustomize reads no file outside a kustomization's directory, so the component
``deploy/k8s/components/monitoring`` cannot load ``alerts.yml`` or the dashboard itself;
this script writes there:

- ``prometheusrule.yaml``: a prometheus-operator ``PrometheusRule`` whose ``spec.groups`` is
  the ``groups`` of ``alerts.yml``;
- ``dashboard.yaml``: a ConfigMap labelled ``grafana_dashboard: "1"`` (the Grafana sidecar's
  convention, as in kube-prometheus-stack) holding ``dashboards/epicrisis.json`` verbatim.

Rerun it after editing either source; tests/test_monitoring.py fails while they are stale.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
HERE = ROOT / "deploy" / "monitoring"
ALERTS = HERE / "alerts.yml"
DASHBOARD = HERE / "dashboards" / "epicrisis.json"
COMPONENT = ROOT / "deploy" / "k8s" / "components" / "monitoring"
PROMETHEUS_RULE = COMPONENT / "prometheusrule.yaml"
DASHBOARD_CONFIGMAP = COMPONENT / "dashboard.yaml"

LABELS = {"app.kubernetes.io/name": "epicrisis", "app.kubernetes.io/component": "monitoring"}


class _Dumper(yaml.SafeDumper):
    """A SafeDumper in the style of the hand-written manifests: list items indented under
    their key, multi-line strings (PromQL, the dashboard) as ``|`` blocks."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None  # PyYAML falls back to quotes where | cannot be
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


def _relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)


def _document(obj: dict[str, Any], source: Path) -> str:
    """``obj`` as YAML (keys in the order given), under a do-not-edit header."""
    header = f"# generated from {_relative(source)} by {_relative(Path(__file__))}; do not edit\n"
    body = yaml.dump(obj, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)
    return header + body


def prometheus_rule(alerts_text: str) -> dict[str, Any]:
    """The PrometheusRule whose spec.groups are the groups of a Prometheus rule file."""
    rules = yaml.safe_load(alerts_text)
    if not isinstance(rules, dict) or set(rules) != {"groups"}:
        raise ValueError(f"{_relative(ALERTS)}: expected a rule file with only `groups:`")
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "epicrisis", "labels": dict(LABELS)},
        "spec": {"groups": rules["groups"]},
    }


def dashboard_configmap(dashboard_text: str) -> dict[str, Any]:
    """The ConfigMap that Grafana's sidecar loads the dashboard from (the JSON text as is)."""
    json.loads(dashboard_text)  # refuse to ship a dashboard Grafana cannot parse
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "epicrisis-dashboard",
            "labels": {**LABELS, "grafana_dashboard": "1"},
        },
        "data": {DASHBOARD.name: dashboard_text},
    }


def render() -> dict[Path, str]:
    """Each generated file and its content, from the sources as they are now."""
    return {
        PROMETHEUS_RULE: _document(prometheus_rule(ALERTS.read_text()), ALERTS),
        DASHBOARD_CONFIGMAP: _document(dashboard_configmap(DASHBOARD.read_text()), DASHBOARD),
    }


def stale() -> list[Path]:
    """The generated files that are missing or differ from a fresh render."""
    return [
        path for path, text in render().items() if not path.is_file() or path.read_text() != text
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 if a file is stale"
    )
    args = parser.parse_args(argv)
    if args.check:
        outdated = stale()
        for path in outdated:
            sys.stderr.write(
                f"{_relative(path)} is stale: run python {_relative(Path(__file__))}\n"
            )
        return 1 if outdated else 0
    for path, text in render().items():
        path.write_text(text)
        sys.stdout.write(f"wrote {_relative(path)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
