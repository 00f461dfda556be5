"""The monitoring kit under deploy/monitoring: alert rules, their unit tests, the Grafana dashboard.

promtool (from ``.ci/fetch-prometheus``) checks and unit-tests the rules and parses every
dashboard query. Every ``epicrisis_*`` series that the rules and the dashboard name must be
in the metric catalogue (``epicrisis.observability.metrics``), with the labels they use, so a
renamed metric or label fails here; every ``tgi_*`` series must be one TGI documents; every
alert's runbook must be a heading of deploy/README.md. The Kubernetes copies of the rules and
the dashboard (``deploy/monitoring/render_k8s.py`` writes them into the monitoring component)
must be what a fresh render gives, and promtool must accept the rules as rendered.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase
from tests.tools import tool

from epicrisis.observability import metrics

ROOT = Path(__file__).resolve().parents[1]
MONITORING = ROOT / "deploy" / "monitoring"
ALERTS = MONITORING / "alerts.yml"
ALERT_TESTS = MONITORING / "alerts.test.yml"
DASHBOARD = MONITORING / "dashboards" / "epicrisis.json"
RUNBOOK = ROOT / "deploy" / "README.md"
RENDER_K8S = MONITORING / "render_k8s.py"

SCRAPE_JOBS = {"epicrisis-server", "epicrisis-worker", "tgi"}
MODEL_JOBS = {"tgi", "vllm"}  # the model server's job: TGI, or vLLM in its overlay
TARGET_LABELS = {"job", "instance"}  # added by Prometheus to every scraped series

# TGI's router metrics, from its documentation (docs/source/reference/metrics.md in
# huggingface/text-generation-inference) and router (tgi_request_failure{err}). Counters are
# exported without a _total suffix; histograms with _bucket, _sum and _count.
TGI_METRICS = {
    "tgi_batch_current_max_tokens",
    "tgi_batch_current_size",
    "tgi_batch_decode_duration",
    "tgi_batch_filter_duration",
    "tgi_batch_forward_duration",
    "tgi_batch_inference_count",
    "tgi_batch_inference_duration",
    "tgi_batch_inference_success",
    "tgi_batch_next_size",
    "tgi_queue_size",
    "tgi_request_count",
    "tgi_request_duration",
    "tgi_request_generated_tokens",
    "tgi_request_inference_duration",
    "tgi_request_input_length",
    "tgi_request_max_new_tokens",
    "tgi_request_mean_time_per_token_duration",
    "tgi_request_queue_duration",
    "tgi_request_skipped_tokens",
    "tgi_request_success",
    "tgi_request_validation_duration",
    "tgi_request_failure",
}
_SERIES = re.compile(r"(?<![\w$])(epicrisis_[a-z0-9_]+)")  # not Grafana's $variables
_TGI_SERIES = re.compile(r"(?<![\w$])(tgi_[a-z0-9_]+)")
_SELECTOR = re.compile(r"(?<![\w$])((?:epicrisis|tgi)_[a-z0-9_]+)\{([^}]*)\}")
_MATCHER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
_BY = re.compile(r"\bby\s*\(([^)]*)\)\s*\((?:\s*\w+\()?\s*(epicrisis_[a-z0-9_]+)")


# -- what the catalogue exports -------------------------------------------------------------

_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("_sum", "_count", "_created"),
    "info": ("_info",),
}


def _catalogue() -> dict[str, set[str] | None]:
    """Exposition name -> its label names (None where the registry does not say)."""
    labels: dict[str, tuple[str, ...]] = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            labels[value._name] = tuple(getattr(value, "_labelnames", ()))
    for family in metrics.ENDPOINTS.collect():
        labels[family.name] = tuple(getattr(family, "_labelnames", ()))
    names: dict[str, set[str] | None] = {}
    for family in REGISTRY.collect():
        if not family.name.startswith("epicrisis_"):
            continue
        known = labels.get(family.name)
        for suffix in _SUFFIXES.get(family.type, ("",)):
            extra = {"le"} if suffix == "_bucket" else set()
            names[family.name + suffix] = None if known is None else {*known, *extra}
        for sample in family.samples:  # an Info's labels are its keys, seen in its sample
            seen = names.get(sample.name)
            if seen is not None:
                seen.update(sample.labels)
    return names


# -- what the rules and the dashboard use ----------------------------------------------------


def _rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(ALERTS.read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


def _alerts() -> list[dict[str, Any]]:
    return [rule for rule in _rules() if "alert" in rule]


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # collapsed rows hold their panels


def _queries(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in _panels(dashboard) for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            exprs.append(query.get("query", ""))
    return exprs


def _rule_texts() -> list[str]:
    texts = []
    for rule in _rules():
        texts.append(rule["expr"])
        texts.extend(str(v) for v in rule.get("annotations", {}).values())
    return texts


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)


# -- the rules ---------------------------------------------------------------------------------


def test_promtool_check_rules() -> None:
    result = _run(tool("promtool"), "check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_rule_unit_tests_pass() -> None:
    result = _run(tool("promtool"), "test", "rules", str(ALERT_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_have_severity_for_annotations_and_a_firing_unit_test() -> None:
    tests = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    fired = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    quiet = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if not case.get("exp_alerts")
    }
    names = {rule["alert"] for rule in _alerts()}
    for rule in _alerts():
        assert rule["labels"]["severity"] in {"page", "ticket"}, rule["alert"]
        assert rule.get("for"), f"{rule['alert']} fires on a single evaluation"
        assert {"summary", "description", "runbook_url"} <= set(rule["annotations"]), rule["alert"]
    required = {
        "EpicrisisHighErrorRate",
        "EpicrisisQueueTooOld",
        "EpicrisisNoHealthyLLMEndpoint",
        "EpicrisisHighFallbackRate",
        "EpicrisisSaturated",
        "EpicrisisNotServing",
        "EpicrisisTargetDown",
    }
    assert required <= names
    assert names <= fired, f"alerts never shown firing: {sorted(names - fired)}"
    assert names <= quiet, f"alerts never shown staying quiet: {sorted(names - quiet)}"


def test_alerts_watch_only_the_scrape_jobs_the_deployment_defines() -> None:
    used = {
        job
        for text in _rule_texts()
        for match in re.finditer(r'job=~?"([^"]+)"', text)
        for job in match.group(1).split("|")
    }
    assert used == SCRAPE_JOBS | MODEL_JOBS
    compose = ROOT / "deploy" / "compose" / "prometheus.yml"
    if compose.is_file():  # the compose deployment's Prometheus scrapes under these names
        config = yaml.safe_load(compose.read_text())
        jobs = {c["job_name"] for c in config.get("scrape_configs", [])}
        assert jobs >= SCRAPE_JOBS, f"{compose.relative_to(ROOT)} scrapes {sorted(jobs)}"


def test_runbook_urls_point_at_headings_of_the_deploy_readme() -> None:
    text = RUNBOOK.read_text()
    anchors = {_anchor(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*$", text, re.M)}
    for rule in _alerts():
        url = rule["annotations"]["runbook_url"]
        path, _, anchor = url.partition("#")
        assert path == "deploy/README.md", url
        assert anchor == rule["alert"].lower(), url
        assert anchor in anchors, f"deploy/README.md has no heading for #{anchor}"


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


# -- the dashboard -----------------------------------------------------------------------------


def test_dashboard_is_provisionable_with_a_datasource_variable() -> None:
    dashboard = _dashboard()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert dashboard.get("uid") and dashboard.get("title")
    assert "__inputs" not in dashboard  # an export for import, not for provisioning
    # No data source is named by uid anywhere: only the variable (or Grafana's built-in one).
    text = json.dumps(dashboard)
    uids = set(re.findall(r'"uid":\s*"([^"]*)"', text)) - {dashboard["uid"]}
    assert uids <= {"${datasource}", "-- Grafana --"}, uids


def test_dashboard_panels_have_titles_queries_and_unique_ids() -> None:
    dashboard = _dashboard()
    ids: list[int] = []
    for panel in _panels(dashboard):
        ids.append(panel["id"])
        assert panel.get("title"), f"panel {panel['id']} has no title"
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target.get("datasource", panel["datasource"])["uid"] == "${datasource}"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    titles = [p["title"] for p in _panels(dashboard) if p["type"] == "row"]
    assert titles == ["Service (gRPC edge)", "Jobs", "LLM", "TGI backends"]


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """Each query, with Grafana's variables filled in, as a recording rule for promtool to parse."""
    exprs = [
        e.replace("$__rate_interval", "5m").replace("$tgi_instance", ".*")
        for e in _queries(_dashboard())
        if not e.startswith("label_values(")
    ]
    rules = [{"record": f"dashboard:query_{i}", "expr": e} for i, e in enumerate(exprs)]
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = _run(tool("promtool"), "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


# -- names against the catalogue and TGI -------------------------------------------------------


@pytest.mark.parametrize("source", ["rules", "dashboard"])
def test_every_epicrisis_series_and_label_is_in_the_catalogue(source: str) -> None:
    catalogue = _catalogue()
    texts = _rule_texts() if source == "rules" else _queries(_dashboard())
    used = {name for text in texts for name in _SERIES.findall(text)}
    assert used, "no epicrisis_ series found"
    missing = sorted(used - set(catalogue))
    assert not missing, f"not in epicrisis.observability.metrics: {missing}"
    for text in texts:
        for name, matchers in _SELECTOR.findall(text):
            allowed = catalogue.get(name)
            if allowed is None:
                continue
            for label in _MATCHER.findall(matchers):
                assert label in allowed | TARGET_LABELS, f"{name} has no label {label!r}"
        for by, name in _BY.findall(text):
            allowed = catalogue.get(name)
            if allowed is None:
                continue
            for label in filter(None, (s.strip() for s in by.split(","))):
                assert label in allowed | TARGET_LABELS, f"{name} has no label {label!r}"


def test_every_tgi_series_is_one_tgi_exports() -> None:
    used = {name for text in _queries(_dashboard()) for name in _TGI_SERIES.findall(text)}
    assert {"tgi_queue_size", "tgi_batch_current_size"} <= used
    for name in used:
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        assert base in TGI_METRICS, f"{name} is not a TGI metric"


# -- the Kubernetes copies (deploy/k8s/components/monitoring) ---------------------------------


def _render_k8s() -> ModuleType:
    """deploy/monitoring/render_k8s.py, imported from its path (deploy/ is not a package)."""
    spec = importlib.util.spec_from_file_location("render_k8s", RENDER_K8S)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kubernetes_copies_are_fresh() -> None:
    render_k8s = _render_k8s()
    rendered: dict[Path, str] = render_k8s.render()
    assert set(rendered) == {render_k8s.PROMETHEUS_RULE, render_k8s.DASHBOARD_CONFIGMAP}
    for path, text in rendered.items():
        where = path.relative_to(ROOT)
        assert path.is_file(), f"{where} missing: run python deploy/monitoring/render_k8s.py"
        assert path.read_text() == text, (
            f"{where} is stale: run python deploy/monitoring/render_k8s.py"
        )
        assert text.startswith("# generated from deploy/monitoring/"), where
    assert render_k8s.main(["--check"]) == 0
    rule = yaml.safe_load(rendered[render_k8s.PROMETHEUS_RULE])
    assert rule["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"]
    configmap = yaml.safe_load(rendered[render_k8s.DASHBOARD_CONFIGMAP])
    assert configmap["data"] == {"epicrisis.json": DASHBOARD.read_text()}


def test_render_k8s_check_names_a_stale_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    render_k8s = _render_k8s()
    stale = tmp_path / "prometheusrule.yaml"
    stale.write_text(render_k8s.PROMETHEUS_RULE.read_text() + "# edited by hand\n")
    monkeypatch.setattr(render_k8s, "PROMETHEUS_RULE", stale)
    assert render_k8s.main(["--check"]) == 1
    assert "prometheusrule.yaml is stale" in capsys.readouterr().err
    assert stale.read_text().endswith("# edited by hand\n")  # --check writes nothing


def test_promtool_accepts_the_rendered_prometheus_rule(tmp_path: Path) -> None:
    render_k8s = _render_k8s()
    rule = yaml.safe_load(render_k8s.render()[render_k8s.PROMETHEUS_RULE])
    path = tmp_path / "prometheusrule_groups.yml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False))
    result = _run(tool("promtool"), "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in result.stdout, result.stdout
