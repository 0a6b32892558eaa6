"""deploy/grafana/pyturn.json and deploy/prometheus/pyturn-alerts.yml against real parts.

A real Prometheus (Debian's package) scrapes a running pyturn with the alerting rules
loaded; `promtool check rules` accepts them; and every metric that the dashboard and
the rules name exists in a live scrape of a server with two workers and a store (some
metrics exist only with them).
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.interop.server_process import require_tool, run_pyturn, stop_process
from tests.ops.conftest import StartServer
from tests.ops.helpers import OpsServer, wait_until
from tests.redis_server import free_tcp_port

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "pyturn.json"
ALERTS = ROOT / "deploy" / "prometheus" / "pyturn-alerts.yml"
_METRIC = re.compile(r"\b((?:pyturn|process)_[a-z_]+)")
# A histogram or counter is exposed as its family's samples.
_SUFFIXES = ("_bucket", "_count", "_sum", "_total", "_created")


def named_metrics() -> set[str]:
    exprs = [
        target["expr"]
        for panel in json.loads(DASHBOARD.read_text())["panels"]
        for target in panel["targets"]
    ]
    rules = yaml.safe_load(ALERTS.read_text())
    exprs += [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    return {name for expr in exprs for name in _METRIC.findall(expr)}


@pytest.fixture
def full_server(start_server: StartServer, tmp_path: Path) -> OpsServer:
    """Two workers and a SQLite store, so the supervisor's and the store's metrics exist."""
    store = f"sqlite://{tmp_path}/users.db"
    config = tmp_path / "commands.yaml"
    config.write_text(yaml.safe_dump({"realm": "example.org", "store": store}))
    added = run_pyturn("user", "add", "dave", "-c", str(config), "--password-stdin", stdin="pw\n")
    assert added.returncode == 0, added.stderr
    server = start_server({"workers": 2, "store": store})
    server.wait_for_log(r"ready in \d+ ms: 2 workers", timeout=15)
    server.wait_for_log("metrics on http://")
    return server


def test_every_metric_the_dashboard_and_the_rules_name_is_in_a_live_scrape(
    full_server: OpsServer,
) -> None:
    client = full_server.client()  # requests_total has series once a request was answered
    client.allocate()
    client.close()
    status, text = full_server.get("/metrics")
    assert status == 200
    exposed = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1] != "#"}
    named = named_metrics()
    assert len(named) >= 15
    missing = sorted(
        name
        for name in named
        if name not in exposed and not any(name + s in exposed for s in _SUFFIXES)
    )
    assert missing == []


def test_the_dashboard_is_grafana_json_with_a_panel_per_subject() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    titles = [panel["title"] for panel in dashboard["panels"]]
    for subject in ("Allocations", "Relayed bit rate", "Auth failures", "Relay ports", "CPU"):
        assert any(title.startswith(subject) for title in titles), subject
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(titles)
    assert dashboard["templating"]["list"][1]["query"] == "label_values(pyturn_info, instance)"


def test_promtool_accepts_the_alerting_rules() -> None:
    promtool = require_tool("promtool")
    result = subprocess.run(
        [promtool, "check", "rules", str(ALERTS)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 8 rules found" in result.stdout + result.stderr


@pytest.fixture
def prometheus(full_server: OpsServer, tmp_path: Path) -> Iterator[str]:
    """A real Prometheus scraping `full_server` every second, with pyturn's rules."""
    binary = require_tool("prometheus")
    host, port = full_server.metrics_address
    config = tmp_path / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(ALERTS)],
                "scrape_configs": [
                    {"job_name": "pyturn", "static_configs": [{"targets": [f"{host}:{port}"]}]}
                ],
            }
        )
    )
    listen = f"127.0.0.1:{free_tcp_port()}"
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address={listen}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        yield f"http://{listen}"
    finally:
        stop_process(process)
        if process.stderr is not None:
            process.stderr.close()


def api(base: str, path: str, **query: str) -> Any:
    url = f"{base}/api/v1/{path}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 (loopback)
            return json.load(response)["data"]
    except OSError:
        return None


def test_a_real_prometheus_scrapes_pyturn_and_loads_its_rules(
    full_server: OpsServer, prometheus: str
) -> None:
    def scraped() -> bool:
        found = api(prometheus, "query", query='up{job="pyturn"}')
        return bool(found and found["result"] and found["result"][0]["value"][1] == "1")

    wait_until(scraped, timeout=30, interval=0.5)
    client = full_server.client()
    client.allocate()
    deadline = time.monotonic() + 15
    allocations = None
    while time.monotonic() < deadline:
        found = api(prometheus, "query", query="sum(pyturn_allocations)")
        if found and found["result"] and found["result"][0]["value"][1] == "1":
            allocations = 1
            break
        time.sleep(0.5)
    assert allocations == 1
    groups = api(prometheus, "rules")["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert len(rules) == 8
    assert all(rule["health"] == "ok" for rule in rules), rules
    client.close()
