"""deploy/kubernetes: the manifests validate offline against Kubernetes' schemas (no
cluster runs here), say what pyturn's config says, and the config they carry serves for
real with the Secret's values."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from pyturn.config import parse_config
from pyturn.core.auth import mint_rest_credential
from tests.interop.server_process import LOOPBACK, merge_config, next_relay_range
from tests.ops.conftest import StartServer
from tests.ops.helpers import basic_authorization

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "deploy" / "kubernetes"
WORKLOADS = ("DaemonSet", "Deployment")


def documents(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((MANIFESTS / name).read_text()) if doc]


def every_document() -> list[tuple[str, dict[str, Any]]]:
    return [
        (path.name, doc)
        for path in sorted(MANIFESTS.glob("*.yaml"))
        for doc in documents(path.name)
    ]


def secret_data() -> dict[str, str]:
    (secret,) = documents("secret.yaml")
    data: dict[str, str] = secret["stringData"]
    return data


@pytest.mark.parametrize(("name", "document"), every_document(), ids=lambda v: str(v)[:40])
def test_every_manifest_validates_against_the_kubernetes_schema(
    name: str, document: dict[str, Any]
) -> None:
    validator = pytest.importorskip("kubernetes_validate")
    version = validator.utils.latest_version()
    validator.validate(document, version, strict=True)


def pairs() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(file, workload, the config its ConfigMap holds) for each workload."""
    found = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        docs = documents(path.name)
        maps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
        for workload in (d for d in docs if d["kind"] in WORKLOADS):
            volumes = workload["spec"]["template"]["spec"]["volumes"]
            (config_map,) = [v["configMap"]["name"] for v in volumes if "configMap" in v]
            found.append(
                (path.name, workload, yaml.safe_load(maps[config_map]["data"]["pyturn.yaml"]))
            )
    return found


@pytest.mark.parametrize(("name", "workload", "config"), pairs(), ids=lambda v: str(v)[:30])
def test_the_workload_and_its_config_agree(
    name: str, workload: dict[str, Any], config: dict[str, Any], tmp_path: Path
) -> None:
    # What pyturn check-config checks; it reads the secret files, here the Secret's values.
    secret_files = config["auth"]["secret_files"]
    copies = []
    for path in secret_files:
        copy = tmp_path / Path(path).name
        copy.write_text(secret_data()[Path(path).name])
        copies.append(str(copy))
    parsed = parse_config(merge_config(config, {"auth": {"secret_files": copies}}), source=name)
    spec = workload["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["args"] == ["serve", "-c", "/etc/pyturn/pyturn.yaml"]
    mounts = [m["mountPath"] for m in container["volumeMounts"]]
    files = [
        *secret_files,
        parsed.metrics.auth,
        parsed.tls.certificate,
        parsed.tls.private_key,
    ]
    for path in [f for f in files if f is not None]:
        assert any(path.startswith(mount + "/") for mount in mounts), path
    for directory in (parsed.control.socket, parsed.control.state_file):
        assert str(Path(directory).parent) in mounts
    ports = {p["containerPort"] for p in container["ports"]}
    assert {listener.port for listener in parsed.listen} | {parsed.metrics.port} == ports
    for probe, path in (("livenessProbe", "/live"), ("readinessProbe", "/ready")):
        assert container[probe]["httpGet"]["path"] == path
    # Probes come from the kubelet, not from loopback: the port must be reachable, and
    # then guarded.
    assert parsed.metrics.address == "0.0.0.0"
    assert parsed.metrics.auth is not None
    # The Secret holds every file the config reads from it.
    for path in [*secret_files, parsed.metrics.auth]:
        if path.startswith("/etc/pyturn/secrets/"):
            assert Path(path).name in secret_data()
    assert spec["terminationGracePeriodSeconds"] > parsed.shutdown_timeout
    if any(listener.proxy_protocol for listener in parsed.listen):
        assert all(
            listener.trusted_proxies for listener in parsed.listen if listener.proxy_protocol
        )


def test_the_daemonsets_config_serves_with_the_secrets_values(
    start_server: StartServer, tmp_path: Path
) -> None:
    """The ConfigMap's config, with the Secret's files, its paths moved into a temporary
    directory and its sockets onto loopback: ready, guarded, and the REST secret works."""
    (_, _, config), *_ = [p for p in pairs() if p[0] == "daemonset.yaml"]
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    for key, value in secret_data().items():
        (secrets / key).write_text(value)
    min_port, max_port = next_relay_range()
    local = merge_config(
        config,
        {
            "listen": [
                {"transport": "udp", "address": LOOPBACK, "port": 0},
                {"transport": "tcp", "address": LOOPBACK, "port": 0},
            ],
            "relay": {"address": LOOPBACK, "min_port": min_port, "max_port": max_port},
            "auth": {"secret_files": [str(secrets / "rest-secret")]},
            "metrics": {"address": LOOPBACK, "port": 0, "auth": str(secrets / "metrics-users")},
            "control": {"enabled": False},
            "peers": {"allow": ["127.0.0.0/8"]},
            "workers": 2,
        },
    )
    server = start_server(local)
    user, _, password = secret_data()["metrics-users"].strip().partition(":")

    assert server.get("/ready")[0] == 200
    assert server.get("/metrics")[0] == 401
    assert server.get("/metrics", basic_authorization(user, password))[0] == 200
    minted = mint_rest_credential(secret_data()["rest-secret"], int(time.time()) + 600, "k8s")
    client = server.client("udp", user=minted["username"], password=minted["credential"])
    try:
        relayed, _ = client.allocate()
    finally:
        client.close()
    assert relayed[0] == LOOPBACK
