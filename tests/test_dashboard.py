"""The Grafana dashboard of the ``monitoring`` component queries only what the services really export: the
services run an ensemble on real parts, their ``/metrics`` are scraped, and every metric name (and label) of
every panel's PromQL is found there."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml
from nats.aio.client import Client
from prometheus_client.parser import text_string_to_metric_families

from ensemble_core import health, subjects
from ensemble_core.messages import MemberSpec
from ensemble_core.settings import Settings
from ensemble_core.subjects import MemberAddress
from ensemble_core.tokens import ensemble_token
from tests.conftest import REPO, wait_for
from tests.test_health import free_port
from tests.test_status import SHORT

DASHBOARD = REPO / "deploy/kustomize/components/monitoring/dashboard.json"
CLI = [sys.executable, "-m", "ensemble_cli"]
SERVICES = ("creator", "poller", "decider", "actuator")
#: Labels Prometheus gives every series of a scraped target (the ServiceMonitor's); no service exports them.
TARGET_LABELS = {"container", "pod", "namespace", "service", "job", "instance", "endpoint"}
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or", "unless"}
_GROUPING = r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)"


def promql(expression: str) -> tuple[set[str], set[str]]:
    """The metric names and the label names a PromQL expression (or Grafana's ``label_values(...)``) uses."""
    text = expression.strip()
    labels: set[str] = set()
    values = re.fullmatch(r"label_values\((.*),\s*([A-Za-z_]\w*)\s*\)", text)
    if values:
        text = values[1]
        labels.add(values[2])
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)  # strings: Grafana variables, label values
    text = re.sub(r"\[[^\]]*\]", "", text)  # range and subquery durations
    for matchers in re.findall(r"\{([^}]*)\}", text):
        labels |= set(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", matchers))
    text = re.sub(r"\{[^}]*\}", "", text)
    for grouping in re.findall(_GROUPING, text):
        labels |= {label.strip() for label in grouping.split(",") if label.strip()}
    text = re.sub(_GROUPING, "", text)
    names = {
        found[1]
        for found in re.finditer(r"(?<![\w.$])([A-Za-z_:][\w:]*)\s*(\()?", text)
        if not found[2] and found[1] not in _KEYWORDS
    }
    return names, labels


def queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, expression) of every panel target and every query variable."""
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r} {target['refId']}", target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            yield f"variable {variable['name']}", query["query"] if isinstance(query, dict) else query


def test_promql_names_are_read_as_prometheus_reads_them() -> None:
    assert promql('histogram_quantile(0.95, sum by (le) (rate(a_bucket{x="$y", z=~"1e3.*"}[$__rate_interval])))') == (
        {"a_bucket"},
        {"le", "x", "z"},
    )
    assert promql("sum(b) / ignoring(k) c offset 5m > bool 0") == ({"b", "c"}, {"k"})
    assert promql('label_values(d{ns="$ns"}, ensemble)') == ({"d"}, {"ns", "ensemble"})


def test_every_panel_has_a_query_and_the_ensemble_panels_follow_the_variables() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert [v["name"] for v in dashboard["templating"]["list"]] == ["datasource", "namespace", "ensemble"]
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        if "all ensembles" not in panel["title"]:
            assert any('ensemble="$ensemble"' in t["expr"] for t in panel["targets"]), panel["title"]
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    wanted = ("nodes requested and up", "queue", "decisions by action", "apply latency", "dead letters", "sidecar")
    assert all(title in titles for title in wanted), titles


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed, so kustomize cannot render")
def test_the_monitoring_component_provisions_the_dashboard_for_grafanas_sidecar() -> None:
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(REPO / "deploy/kustomize/overlays/production")],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    (config,) = [
        o
        for o in yaml.safe_load_all(rendered)
        if o and o["kind"] == "ConfigMap" and o["metadata"]["name"] == "ensemble-grafana-dashboard"
    ]
    assert config["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config["metadata"]["namespace"] == "ensemble-system"
    assert json.loads(config["data"]["ensemble-operator.json"]) == json.loads(DASHBOARD.read_text())


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def exported(texts: list[str]) -> dict[str, set[str]]:
    """Every sample name the texts expose (``_total``, ``_bucket`` … as Prometheus stores them), each with the
    label names its samples carry."""
    found: dict[str, set[str]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            suffixes = {
                "counter": ("_total", "_created"),
                "histogram": ("_bucket", "_count", "_sum", "_created"),
                "summary": ("", "_count", "_sum", "_created"),
            }.get(family.type, ("",))
            for suffix in suffixes:
                found.setdefault(family.name + suffix, set())
            for sample in family.samples:
                found.setdefault(sample.name, set()).update(sample.labels)
    return found


async def test_every_metric_a_panel_queries_is_exported_by_a_service(
    nc: Client, settings: Settings, tmp_path: Path
) -> None:
    from ensemble_cli.up import Stack

    spec_file = tmp_path / "short.yaml"
    spec_file.write_text(SHORT)
    token = "dashboard-token"
    stack = Stack(tmp_path)
    ports = {service: free_port() for service in SERVICES}
    texts: list[str] = []
    try:
        sidecar = stack.start(
            "sidecar",
            [*CLI, "sidecar", "--port", "0", "--nodes", "1", "--max-nodes", "2", "--provision-delay", "0.5"],
            env={"ENSEMBLE_SIDECAR_TOKEN": ensemble_token(token, "default", "short")},
        )
        await wait_for(lambda: "\n" in sidecar.log.read_text(), timeout=20)
        endpoint = f"127.0.0.1:{sidecar.log.read_text().splitlines()[0]}"
        for service in SERVICES:
            env = {
                "ENSEMBLE_NATS_URL": settings.nats_url,
                "ENSEMBLE_SIDECAR_TOKEN": token,
                "ENSEMBLE_FILE": str(spec_file),
                "ENSEMBLE_ENDPOINTS": f"0={endpoint}",
                "ENSEMBLE_HEALTH_PORT": str(ports[service]),
            }
            stack.start(service, [*CLI, service], env=env)
        # while the member runs, the poller exports its nodes and queue (removed once it is no longer polled)
        polled: list[str] = []

        def member_exported() -> bool:
            assert stack.died() is None, f"{stack.died()} died"
            try:
                text = scrape(ports["poller"])
            except OSError:
                return False
            polled[:] = [text]
            return "ensemble_member_nodes_requested{" in text and 'ensemble="short"' in text

        await wait_for(member_exported, timeout=40, interval=0.2)
        texts += polled
        members = await nc.jetstream().key_value(subjects.MEMBERS_BUCKET)

        async def terminated() -> bool:
            assert stack.died() is None, f"{stack.died()} died"
            entry = await members.get(MemberAddress("default", "short", 0).key)
            return msgspec.json.decode(entry.value or b"", type=MemberSpec).phase == "terminated"

        await wait_for(terminated, timeout=60, interval=0.3)
        texts += [scrape(ports[service]) for service in SERVICES]
    finally:
        await stack.stop()

    samples = exported(texts)
    # the per-ensemble series carry the ensemble's labels, never a `namespace` Prometheus would rename
    assert {"ensemble_namespace", "ensemble", "member"} <= samples["ensemble_member_nodes_requested"]
    assert {"ensemble_namespace", "ensemble", "action"} <= samples["ensemble_decisions_total"]
    assert {"ensemble_namespace", "ensemble", "action", "le"} <= samples["ensemble_apply_seconds_bucket"]
    # errors did not happen in this run, so their labels are read from the metrics themselves
    labelled = {
        "ensemble_sidecar_errors_total": set(health.SIDECAR_ERRORS._labelnames),
        "ensemble_deadletters_total": set(health.DEADLETTERS._labelnames),
    }
    # and none of them is one Prometheus sets on the target (it would rename it)
    for name in samples:
        if name.startswith("ensemble_member_") or name in labelled:
            assert not samples[name] & {"namespace", "pod", "container", "service"}, name
    for name, labels in labelled.items():
        samples[name] |= labels
    dashboard = json.loads(DASHBOARD.read_text())
    checked = 0
    for where, expression in queries(dashboard):
        names, labels = promql(expression)
        assert names, f"{where}: no metric in {expression!r}"
        for name in names:
            assert name in samples, f"{where}: {name} is not exported by any service ({expression!r})"
            checked += 1
        exported_labels = set.union(*(samples[name] for name in names))
        carried = exported_labels | TARGET_LABELS
        assert labels <= carried, f"{where}: labels {sorted(labels - carried)} are on none of {sorted(names)}"
        # a label both the service and the scrape target set is renamed exported_<label> by Prometheus
        clashing = labels & exported_labels & TARGET_LABELS
        assert not clashing, f"{where}: {sorted(clashing)} would be the target's, not the service's"
    assert checked >= 15
