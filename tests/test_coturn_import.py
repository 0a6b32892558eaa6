"""`pyturn import-coturn`: the coturn configs that deployments publish, converted.

tests/coturn_configs/ holds the options each deployment's published config sets, with
their value shapes (rendered with example values where the original is a template).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from pyturn.config import parse_config
from pyturn.core.policy import PeerPolicy
from pyturn.coturn_import import (
    DROPPED,
    MAPPED,
    UNSUPPORTED,
    WARNING,
    Outcome,
    convert,
    read_args,
    read_file,
    split_args,
)
from tests.interop.server_process import run_pyturn as pyturn

CONFIGS = Path(__file__).parent / "coturn_configs"
DEPLOYMENTS = sorted(path.stem for path in CONFIGS.glob("*.conf"))


def converted(name: str) -> tuple[dict[str, Any], list[Outcome]]:
    options = read_file((CONFIGS / f"{name}.conf").read_text(), f"{name}.conf")
    args = CONFIGS / f"{name}.args"
    if args.exists():
        options += read_args(split_args(args.read_text()))[0]
    return convert(options)


def policy_of(config: dict[str, Any]) -> PeerPolicy:
    peers = config.get("peers", {})
    return PeerPolicy(peers.get("allow", ()), peers.get("deny", ()))


def test_the_published_configs_are_all_here() -> None:
    assert DEPLOYMENTS == [
        "bigbluebutton",
        "coturn-docker",
        "jitsi",
        "matrix-docker-ansible-deploy",
        "nextcloud",
        "synapse",
        "wire",
    ]


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_every_option_of_a_published_config_is_mapped_or_dropped(name: str) -> None:
    config, outcomes = converted(name)
    lines = [
        line
        for line in (CONFIGS / f"{name}.conf").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    from_file = [o for o in outcomes if o.option.where.startswith(f"{name}.conf:")]
    assert len(from_file) == len(lines)
    unsupported = [o.line() for o in outcomes if o.kind == UNSUPPORTED]
    assert unsupported == []
    # What comes out is a valid pyturn config.
    parse_config(config)


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_the_converted_config_passes_check_config(name: str, tmp_path: Path) -> None:
    args = CONFIGS / f"{name}.args"
    extra = ["--args", args.read_text().strip()] if args.exists() else []
    result = pyturn("import-coturn", str(CONFIGS / f"{name}.conf"), *extra)
    assert result.returncode == 0, result.stderr
    path = tmp_path / "pyturn.yaml"
    path.write_text(result.stdout)
    check = pyturn("check-config", "--quiet", str(path))
    assert check.returncode == 0, check.stderr
    for line in result.stderr.splitlines():
        assert f": {MAPPED}: " in line or f": {DROPPED}: " in line or f": {WARNING}: " in line


def test_synapses_config_keeps_its_secret_quotas_and_peers() -> None:
    config, outcomes = converted("synapse")
    assert config["realm"] == "turn.example.org"
    assert config["auth"] == {"secrets": ["synapse-shared-secret"]}
    # "user-quota=12 # ..." is 12: the trailing comment is not part of the value.
    assert config["quotas"] == {"allocations_per_user": 12, "allocations_total": 1200}
    assert config["tls"] == {
        "certificate": "/etc/letsencrypt/live/turn.example.org/fullchain.pem",
        "private_key": "/etc/letsencrypt/live/turn.example.org/privkey.pem",
    }
    assert config["peers"]["allow"] == ["10.0.0.1"]
    assert len(config["peers"]["deny"]) == 22
    assert [o.kind for o in outcomes if o.option.name == "user-quota"] == [MAPPED]


# Peers each deployment allows (True) or denies (False) once converted; coturn's reading
# of the same config gives the same answers (see tests/interop/test_coturn_migration.py).
PEERS: dict[str, dict[str, bool]] = {
    "synapse": {"8.8.8.8": True, "10.0.0.1": True, "10.0.0.2": False, "198.51.100.20": False},
    "nextcloud": {"8.8.8.8": True, "10.0.0.5": True, "10.0.0.1": False, "172.16.0.1": False},
    "jitsi": {"8.8.8.8": True, "10.0.0.1": False, "2606:4700::1111": True, "fe80::1": False},
    "bigbluebutton": {
        "198.51.100.20": True,
        "10.0.0.5": True,
        "10.0.0.6": False,
        "8.8.8.8": False,
        "2606:4700::1111": False,
    },
    "matrix-docker-ansible-deploy": {"8.8.8.8": True, "192.168.1.1": False, "::1": False},
    "wire": {"8.8.8.8": True, "198.51.100.1": False, "2606:4700::1111": True},
    "coturn-docker": {"8.8.8.8": True, "2606:4700::1111": True},
}


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_converted_peer_policies_allow_and_deny_what_the_deployment_does(name: str) -> None:
    config, _ = converted(name)
    policy = policy_of(config)
    for address in ("127.0.0.1", "169.254.169.254", "::1", "224.0.0.1", "0.0.0.0"):
        assert not policy.is_allowed(address), address
    for address, allowed in PEERS[name].items():
        assert policy.is_allowed(address) is allowed, address


@pytest.mark.parametrize("name", ["wire", "coturn-docker"])
def test_where_coturn_relays_to_private_peers_the_import_warns(name: str) -> None:
    _, outcomes = converted(name)
    (warning,) = [o for o in outcomes if o.kind == WARNING and "built-in" in o.detail]
    assert "10.0.0.0/8" in warning.detail
    assert "192.168.0.0/16" in warning.detail
    assert "127.0.0.0/8" not in warning.detail  # coturn refuses loopback too


def test_a_deny_inside_an_allow_is_left_out_as_coturn_lets_allow_win() -> None:
    options = read_file(
        "allowed-peer-ip=10.0.0.0-10.255.255.255\n"
        "denied-peer-ip=10.1.0.0-10.1.255.255\n"
        "denied-peer-ip=8.8.8.0-8.8.8.255\n",
        "t.conf",
    )
    config, outcomes = convert(options)
    assert config["peers"] == {"allow": ["10.0.0.0-10.255.255.255"], "deny": ["8.8.8.0-8.8.8.255"]}
    assert policy_of(config).is_allowed("10.1.2.3")
    assert any("allowed-peer-ip wins in coturn" in o.detail for o in outcomes)


def test_an_allowed_loopback_peer_stays_refused_without_allow_loopback_peers() -> None:
    config, _ = convert(read_file("allowed-peer-ip=127.0.0.1\n", "t.conf"))
    assert not policy_of(config).is_allowed("127.0.0.1")
    config, _ = convert(read_file("allowed-peer-ip=127.0.0.1\nallow-loopback-peers\n", "t.conf"))
    assert policy_of(config).is_allowed("127.0.0.1")


# -- mistakes ------------------------------------------------------------------------------


def test_a_typo_is_named_with_its_line_and_a_suggestion(tmp_path: Path) -> None:
    path = tmp_path / "turnserver.conf"
    path.write_text("realm=example.org\nlisting-port=3478\n")
    result = pyturn("import-coturn", str(path))
    assert result.returncode == 1
    assert f"{path}:2: listing-port: unsupported: not a coturn option" in result.stderr
    assert "did you mean listening-port?" in result.stderr


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("listening-port=34x78", "bad value: '34x78' is not a whole number"),
        ("min-port=70000", "bad value: 70000 is out of range"),
        ("denied-peer-ip=10.0.0.0/8", "coturn takes IP or IP-IP here, not CIDR"),
        ("denied-peer-ip=10.0.0.9-10.0.0.1", "invalid range"),
        ("external-ip=turn.example.org", "is not an IP address"),
        ("user=alice", "must be NAME:PASSWORD or NAME:0xKEY"),
        ("static-auth-secret=<your secret>", "is a placeholder: fill it in first"),
        ("external-ip=$(detect-external-ip)", "is a placeholder"),
        ("listening-ip=__COTURN_HOST_IP__", "is a placeholder"),
        ("fingerprint=maybe", "bad value: 'maybe' is not yes or no"),
    ],
)
def test_bad_values_are_named_with_their_line(line: str, problem: str) -> None:
    _, outcomes = convert(read_file(f"realm=x\n{line}\n", "t.conf"))
    assert outcomes[1].option.where == "t.conf:2"
    assert outcomes[1].kind == UNSUPPORTED
    assert problem in outcomes[1].detail


def test_a_key_given_twice_says_which_one_wins() -> None:
    config, outcomes = convert(read_file("realm=first\n\nrealm=second\n", "t.conf"))
    assert config["realm"] == "second"
    assert "given twice: this one wins over t.conf:1" in outcomes[1].detail


def test_the_command_line_form_of_a_docker_deployment() -> None:
    options, config_file, no_file = read_args(
        split_args(
            "-n --log-file=stdout --external-ip=192.0.2.7 --realm my.realm.org -a "
            "--use-auth-secret --static-auth-secret=s3cr3t --min-port=49160"
        )
    )
    assert no_file is True
    assert config_file is None
    config, outcomes = convert(options)
    assert config["realm"] == "my.realm.org"
    assert config["relay"] == {"external_address": "192.0.2.7", "min_port": 49160}
    assert config["auth"] == {"secrets": ["s3cr3t"]}
    kinds = [o.kind for o in outcomes]
    assert kinds[:7] == [DROPPED, MAPPED, MAPPED, DROPPED, MAPPED, MAPPED, MAPPED]
    assert UNSUPPORTED not in kinds


def test_the_args_option_reads_the_file_its_c_names(tmp_path: Path) -> None:
    path = tmp_path / "turnserver.conf"
    path.write_text("realm=from-file\nuse-auth-secret\nstatic-auth-secret=s\n")
    result = pyturn("import-coturn", "--args", f"-c {path} --realm=from-args")
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["realm"] == "from-args"


def test_standard_input_and_no_input(tmp_path: Path) -> None:
    result = pyturn("import-coturn", "-", stdin="realm=piped\n")
    assert result.returncode == 0
    assert yaml.safe_load(result.stdout)["realm"] == "piped"
    assert pyturn("import-coturn").returncode == 2


def test_every_relay_ip_and_external_ip_pair_becomes_a_relay_address() -> None:
    config, outcomes = convert(
        read_file(
            "external-ip=192.0.2.7\nexternal-ip=2001:db8::7\nrelay-ip=10.0.0.2\n"
            "relay-ip=10.0.0.3\nexternal-ip=198.51.100.9/10.0.0.4\n",
            "t.conf",
        )
    )
    assert config["relay"] == {
        "address": "10.0.0.2",
        "external_address": "192.0.2.7",
        # coturn relays IPv6 from every address it listens on.
        "address6": "::",
        "external_address6": "2001:db8::7",
        "more_addresses": [
            {"address": "10.0.0.3"},
            {"address": "10.0.0.4", "external_address": "198.51.100.9"},
        ],
    }
    assert [o for o in outcomes if o.kind == UNSUPPORTED] == []
    details = {o.option.value: o.detail for o in outcomes}
    assert details["10.0.0.2"] == "relay.address: 10.0.0.2"
    assert details["10.0.0.3"] == "relay.more_addresses: 10.0.0.3"
    (shared,) = [o for o in outcomes if o.option.where == "relay addresses"]
    assert "share one port range" in shared.detail
    parse_config(config)  # what check-config checks


def test_relay_addresses_that_pyturn_cannot_take_are_unsupported() -> None:
    lines = "".join(f"relay-ip=10.0.0.{i}\n" for i in range(1, 11))
    config, outcomes = convert(
        read_file(lines + "external-ip=192.0.2.1\nexternal-ip=192.0.2.2\n", "t.conf")
    )
    assert config["relay"]["address"] == "10.0.0.1"
    assert config["relay"]["external_address"] == "192.0.2.1"
    assert len(config["relay"]["more_addresses"]) == 7
    refused = [o.option.value for o in outcomes if o.kind == UNSUPPORTED]
    assert refused == ["192.0.2.2", "10.0.0.9", "10.0.0.10"]
    parse_config(config)


def test_use_auth_secret_without_a_secret_asks_for_one() -> None:
    _, outcomes = convert(read_file("use-auth-secret\nrealm=x\n", "t.conf"))
    assert (outcomes[0].option.where, outcomes[0].kind) == ("t.conf:1", MAPPED)
    (refused,) = [o for o in outcomes if o.kind == UNSUPPORTED]
    assert "without a static-auth-secret" in refused.detail


def test_the_docker_images_documented_command_line_converts_on_its_own() -> None:
    args = (CONFIGS / "coturn-docker-run.args").read_text().strip()
    result = pyturn("import-coturn", "--args", args)
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    assert config["realm"] == "my.realm.org"
    assert config["auth"] == {"secrets": ["docker-secret"]}
    # -n: coturn reads no file, so a FILE beside it is a mistake.
    both = pyturn("import-coturn", str(CONFIGS / "coturn-docker.conf"), "--args", args)
    assert both.returncode == 2
    assert "-n (no config file)" in both.stderr


def test_user_lines_are_dropped_when_rest_secrets_are_on_as_coturn_ignores_them() -> None:
    config, outcomes = convert(
        read_file("user=alice:pw\nuse-auth-secret\nstatic-auth-secret=s\n", "t.conf")
    )
    assert config["auth"] == {"secrets": ["s"]}
    assert any("coturn ignores user= lines" in o.detail for o in outcomes)


def test_a_flag_with_a_trailing_comment_is_read_and_said_to_stop_coturn() -> None:
    _, outcomes = convert(read_file("lt-cred-mech # since 4.5\n", "t.conf"))
    assert outcomes[0].kind == DROPPED
    assert "coturn itself stops at this line" in outcomes[0].detail


def test_coturns_channel_numbers_are_kept() -> None:
    config, _ = convert(read_file("realm=x\n", "t.conf"))
    assert config["allocations"] == {"legacy_channel_numbers": True}
