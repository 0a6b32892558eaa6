"""Tests for pyturn.config: YAML loading, validation errors, defaults and dumping."""

import dataclasses
import pickle
import textwrap
from collections.abc import Mapping
from pathlib import Path

import pytest
import yaml

from pyturn.config import (
    REDACTED,
    AllocationsConfig,
    AuthConfig,
    BandwidthConfig,
    Config,
    ConfigError,
    ControlConfig,
    LimitsConfig,
    Listener,
    LoggingConfig,
    MetricsConfig,
    PeersConfig,
    QuotasConfig,
    RelayConfig,
    TlsConfig,
    UserEntry,
    config_to_dict,
    config_warnings,
    default_config,
    load_config,
    parse_config,
    parse_stun_url,
    split_host_port,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "conf" / "pyturn.yaml"
KEY_HEX = "0123456789abcdef0123456789abcdef"


def write(tmp_path: Path, text: str, name: str = "x.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def load_text(tmp_path: Path, text: str) -> Config:
    return load_config(write(tmp_path, text))


def config_error(tmp_path: Path, text: str) -> ConfigError:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.source == str(path)
    assert str(info.value).startswith(f"{path}: ")
    return info.value


def fully_customised() -> Config:
    """A config in which every field differs from its default."""
    return Config(
        realm="example.org",
        listen=(
            Listener("udp", "192.0.2.10", 3478),
            Listener("tcp", "2001:db8::10", 3478),
            Listener("tls", "::", 5349),
            Listener("udp", "127.0.0.1", 0),
        ),
        tls=TlsConfig(
            certificate="/etc/pyturn/cert.pem",
            private_key="/etc/pyturn/key.pem",
            ciphers="ECDHE-RSA-AES128-GCM-SHA256",
            min_version="1.3",
        ),
        relay=RelayConfig(
            address="10.0.0.5",
            external_address="203.0.113.7",
            address6="2001:db8::5",
            external_address6="2001:db8:1::5",
            min_port=40000,
            max_port=40999,
        ),
        auth=AuthConfig(
            users={
                "alice": UserEntry(password="correct horse"),
                "bob": UserEntry(key=bytes.fromhex(KEY_HEX)),
            },
            secrets=("new-secret", "old-secret"),
            nonce_lifetime=300,
            end_expired_sessions=True,
            secure_stun=True,
            rest_separator="-",
        ),
        peers=PeersConfig(allow=("10.1.0.0/16", "fd00::1"), deny=("198.51.100.0/24",)),
        allocations=AllocationsConfig(
            default_lifetime=300,
            max_lifetime=1200,
            legacy_channel_numbers=True,
            tcp_relay=False,
            default_family="keep",
        ),
        quotas=QuotasConfig(
            allocations_per_user=5,
            allocations_total=1000,
            permissions_per_allocation=16,
            channels_per_allocation=32,
        ),
        limits=LimitsConfig(
            unauthenticated_burst=4,
            unauthenticated_rate=1.5,
            connections_per_source=8,
            first_message_timeout=2.0,
        ),
        bandwidth=BandwidthConfig(per_allocation=250_000, per_user=1_000_000, total=10**8),
        metrics=MetricsConfig(enabled=False, address="::1", port=9100),
        control=ControlConfig(
            enabled=False, socket="/srv/turn/control.sock", state_file="/srv/turn/state.json"
        ),
        logging=LoggingConfig(
            level="debug", format="json", file="/var/log/pyturn.log", syslog=True
        ),
        software="pyturn 0.1",
        workers=4,
        shutdown_timeout=2.5,
        alternate_server="[2001:db8::2]:3478",
        redirect_allocations=("192.0.2.20:3478", "[2001:db8::3]:3478"),
        store="sqlite:///var/lib/pyturn/users.db",
    )


# --------------------------------------------------------------------------- defaults


def test_default_config_has_the_documented_values() -> None:
    config = default_config()
    assert config == Config()
    assert config.realm == "pyturn"
    assert config.listen == (
        Listener("udp", "0.0.0.0", 3478),
        Listener("tcp", "0.0.0.0", 3478),
    )
    assert config.tls == TlsConfig(None, None)
    assert config.relay == RelayConfig("0.0.0.0", None, None, None, 49152, 65535)
    assert dict(config.auth.users) == {}
    assert config.auth.secrets == ()
    assert config.auth.nonce_lifetime == 600
    assert config.peers == PeersConfig((), ())
    assert config.allocations == AllocationsConfig(600, 3600)
    assert config.quotas == QuotasConfig(64, 0, 256, 256)
    assert config.metrics == MetricsConfig(True, "127.0.0.1", 9641)
    assert config.logging == LoggingConfig("info", "text")
    assert config.software is None
    assert config.workers == 0
    assert config.shutdown_timeout == 30.0
    assert config.alternate_server is None


def test_an_empty_mapping_an_empty_file_and_a_comment_only_file_all_give_defaults(
    tmp_path: Path,
) -> None:
    assert parse_config({}) == default_config()
    assert parse_config(None) == default_config()
    assert load_text(tmp_path, "") == default_config()
    assert load_text(tmp_path, "# nothing here\n\n") == default_config()


def test_a_key_without_a_value_means_its_default(tmp_path: Path) -> None:
    config = load_text(
        tmp_path,
        """
        relay:
        tls:
        auth:
          users:
          secrets:
        listen:
        software:
        """,
    )
    assert config == default_config()


def test_a_partial_section_keeps_defaults_for_the_keys_it_omits(tmp_path: Path) -> None:
    config = load_text(tmp_path, "relay: {min_port: 50000}\n")
    assert config.relay == dataclasses.replace(RelayConfig(), min_port=50000)
    assert config.quotas == QuotasConfig()


def test_configs_are_frozen_hashable_and_users_are_read_only() -> None:
    config = fully_customised()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.realm = "other"  # type: ignore[misc]
    assert hash(config) == hash(fully_customised())
    parsed = parse_config(config_to_dict(config, redact=False))
    for users in (config.auth.users, parsed.auth.users):
        assert isinstance(users, Mapping)
        with pytest.raises(TypeError):
            users["mallory"] = UserEntry(password="x")  # type: ignore[index]
    assert {parsed, fully_customised()} == {parsed}


# --------------------------------------------------------------------------- example file


def test_the_example_file_loads_and_equals_the_defaults() -> None:
    assert load_config(EXAMPLE) == default_config()


def test_the_example_file_spells_out_every_key() -> None:
    def key_tree(data: object) -> object:
        if isinstance(data, dict):
            return {key: key_tree(value) for key, value in data.items()}
        if isinstance(data, list):
            return [key_tree(item) for item in data]
        return None

    raw = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    assert key_tree(raw) == key_tree(config_to_dict(default_config()))
    assert list(raw) == list(config_to_dict(default_config()))


def test_the_commented_out_examples_in_the_example_file_are_valid(tmp_path: Path) -> None:
    config = load_text(
        tmp_path,
        """
        auth:
          users:
            alice: "a long random password"
            bob: {key: "0x0123456789abcdef0123456789abcdef"}
          secrets:
            - "a long random shared secret"
        listen:
          - transport: tls
            address: 0.0.0.0
            port: 5349
        tls: {certificate: /c.pem, private_key: /k.pem}
        """,
    )
    assert config.auth.users["bob"].key == bytes.fromhex(KEY_HEX)


# --------------------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(
    ("text", "path", "expected"),
    [
        ("relam: x\n", "relam", "realm, listen, tls, relay, auth"),
        ("relay: {min_prot: 1}\n", "relay.min_prot", "address, external_address, address6"),
        (
            "listen: [{transport: udp, address: 0.0.0.0, port: 1}, {transprt: tcp}]\n",
            "listen[1].transprt",
            "transport, address, port",
        ),
        ("auth: {users: {bob: {kye: x}}}\n", "auth.users.bob.kye", "password, key"),
        ("logging: {colour: true}\n", "logging.colour", "level, format"),
        ("42: x\n", "42", "realm"),
    ],
)
def test_unknown_keys_are_rejected_with_their_full_path_and_the_valid_keys(
    tmp_path: Path, text: str, path: str, expected: str
) -> None:
    error = config_error(tmp_path, text)
    assert error.path == path
    assert f": {path}: unknown key (expected one of: {expected}" in str(error)


def test_the_unknown_key_message_has_the_documented_form(tmp_path: Path) -> None:
    path = write(tmp_path, "listen: [{transport: udp, address: '::', port: 1}, {transprt: x}]\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"{path}: listen[1].transprt: unknown key (expected one of: transport, address, port, "
        "proxy_protocol, trusted_proxies)"
    )


# --------------------------------------------------------------------------- bad values


@pytest.mark.parametrize(
    ("text", "path", "fragment"),
    [
        # strings
        ('realm: ""', "realm", "must be a non-empty string"),
        ("realm: 123", "realm", "must be a non-empty string (quote it in YAML), got 123"),
        (f"realm: {'r' * 128}", "realm", "must be shorter than 128 characters"),
        ('software: ""', "software", "must be a non-empty string"),
        ("tls: {certificate: [a]}", "tls.certificate", "got a list"),
        # sections and lists
        ("tls: yes", "tls", "must be a mapping, got True"),
        ("relay: [1, 2]", "relay", "must be a mapping, got a list"),
        ("listen: {transport: udp}", "listen", "must be a list, got a mapping"),
        ("listen: []", "listen", "must not be empty"),
        ("listen: [udp:3478]", "listen[0]", "must be a mapping, got 'udp:3478'"),
        ("listen: [{transport: udp, address: 0.0.0.0}]", "listen[0].port", "is required"),
        ("listen: [{address: 0.0.0.0, port: 1}]", "listen[0].transport", "is required"),
        # literals
        (
            "listen: [{transport: sctp, address: 0.0.0.0, port: 1}]",
            "listen[0].transport",
            "must be one of 'udp', 'tcp', 'tls', 'auto', got 'sctp'",
        ),
        ("logging: {level: verbose}", "logging.level", "'debug', 'info', 'warning', 'error'"),
        ("logging: {format: xml}", "logging.format", "must be one of 'text', 'json'"),
        ("logging: {level: 1}", "logging.level", "got 1"),
        # integers
        ("relay: {min_port: abc}", "relay.min_port", "between 1 and 65535, got 'abc'"),
        ("relay: {max_port: 0}", "relay.max_port", "between 1 and 65535, got 0"),
        ("relay: {max_port: 65536}", "relay.max_port", "got 65536"),
        (
            "listen: [{transport: udp, address: 0.0.0.0, port: 70000}]",
            "listen[0].port",
            "must be an integer between 0 and 65535, got 70000",
        ),
        (
            "listen: [{transport: udp, address: 0.0.0.0, port: true}]",
            "listen[0].port",
            "got True",
        ),
        ("metrics: {port: 1.5}", "metrics.port", "got 1.5"),
        ("metrics: {port: '9641'}", "metrics.port", "got '9641'"),
        ("auth: {nonce_lifetime: 10}", "auth.nonce_lifetime", "must be an integer >= 30"),
        ("allocations: {default_lifetime: 0}", "allocations.default_lifetime", ">= 1, got 0"),
        ("quotas: {allocations_per_user: -1}", "quotas.allocations_per_user", ">= 0, got -1"),
        ("quotas: {allocations_total: no}", "quotas.allocations_total", "got False"),
        ("quotas: {permissions_per_allocation: 0}", "quotas.permissions_per_allocation", ">= 1"),
        (
            "quotas: {channels_per_allocation: 20000}",
            "quotas.channels_per_allocation",
            "between 1 and 16384",
        ),
        ("workers: -1", "workers", "must be an integer >= 0, got -1"),
        # floats
        ("shutdown_timeout: -1", "shutdown_timeout", "must be a number >= 0, got -1"),
        ("shutdown_timeout: 30s", "shutdown_timeout", "got '30s'"),
        ("shutdown_timeout: .inf", "shutdown_timeout", "got inf"),
        ("shutdown_timeout: true", "shutdown_timeout", "got True"),
        # booleans
        ("metrics: {enabled: 'true'}", "metrics.enabled", "must be true or false, got 'true'"),
        ("metrics: {enabled: 1}", "metrics.enabled", "must be true or false, got 1"),
        # addresses
        (
            "listen: [{transport: udp, address: localhost, port: 1}]",
            "listen[0].address",
            "must be an IP address, got 'localhost'",
        ),
        ("relay: {address: '::'}", "relay.address", "must be an IPv4 address, got '::'"),
        ("relay: {external_address: 0.0.0.0}", "relay.external_address", "other than"),
        ("relay: {external_address: 2001:db8::1}", "relay.external_address", "IPv4"),
        ("relay: {address6: 10.0.0.1}", "relay.address6", "must be an IPv6 address"),
        ("metrics: {address: 999.1.1.1}", "metrics.address", "must be an IP address"),
        ("peers: {deny: [10.0.0.0/8, 10.0.0.0/33]}", "peers.deny[1]", "CIDR network"),
        ("peers: {allow: [example.com]}", "peers.allow[0]", "got 'example.com'"),
        ("peers: {allow: 10.0.0.0/8}", "peers.allow", "must be a list"),
        ("alternate_server: turn.example.com:3478", "alternate_server", "IP:PORT"),
        ("alternate_server: '::1:3478'", "alternate_server", "got '::1:3478'"),
        ("alternate_server: '[192.0.2.1]:3478'", "alternate_server", "[IPv6]:PORT"),
        ("alternate_server: '192.0.2.1:0'", "alternate_server", "IP:PORT"),
        ("alternate_server: '[::1]'", "alternate_server", "IP:PORT"),
        # secrets
        ("auth: {secrets: abc}", "auth.secrets", "must be a list, got 'abc'"),
        ("auth: {secrets: ['', x]}", "auth.secrets[0]", "must be a non-empty string"),
        # settings that cannot work together
        (
            "relay: {more_addresses: [{address: 10.0.0.3}]}",
            "relay.more_addresses[0].address",
            "needs a specific address (not 0.0.0.0)",
        ),
        (
            "relay: {address: 10.0.0.2, more_addresses: [{address: '2001:db8::3'}]}",
            "relay.more_addresses[0].address",
            "requires address6",
        ),
        (
            "relay: {address: 10.0.0.2, more_addresses: [{address: 10.0.0.2}]}",
            "relay.more_addresses[0].address",
            "already a relay address",
        ),
        (
            "relay: {address: 10.0.0.2, more_addresses: [{address: 10.0.0.3, "
            "external_address: '2001:db8::3'}]}",
            "relay.more_addresses[0].external_address",
            "must be an IPv4 address",
        ),
        (
            "relay: {address: 10.0.0.1, more_addresses: ["
            + ", ".join(f"{{address: 10.0.0.{i}}}" for i in range(2, 10))
            + "]}",
            "relay.more_addresses",
            "at most 8 IPv4 relay addresses",
        ),
        (
            "relay: {address: 10.0.0.2, more_addresses: [{address: 0.0.0.0}]}",
            "relay.more_addresses[0].address",
            "other than the unspecified address",
        ),
        ("relay: {external_address: auto}", "relay.discover", "must list STUN servers"),
        ("relay: {discover: ['stun:192.0.2.1']}", "relay.discover", "has no effect unless"),
        (
            "relay: {external_address: auto, discover: ['turn:192.0.2.1']}",
            "relay.discover[0]",
            "must be a STUN URL",
        ),
        (
            "relay: {external_address: auto, discover: ['stun:192.0.2.1:99999']}",
            "relay.discover[0]",
            "port must be 1-65535",
        ),
        ("relay: {external_address: otto}", "relay.external_address", 'or "auto"'),
        (
            "relay: {external_address6: auto, discover: ['stun:[2001:db8::1]']}",
            "relay.external_address6",
            "requires address6",
        ),
        (
            "listen: [{transport: udp, address: 0.0.0.0, port: 3478, proxy_protocol: true, "
            "trusted_proxies: [10.0.0.1]}]",
            "listen[0].proxy_protocol",
            "for tcp, tls and auto listeners only",
        ),
        (
            "listen: [{transport: tcp, address: 0.0.0.0, port: 3478, proxy_protocol: true}]",
            "listen[0].trusted_proxies",
            "must name the proxies",
        ),
        (
            "listen: [{transport: tcp, address: 0.0.0.0, port: 3478, trusted_proxies: [10.0.0.1]}]",
            "listen[0].trusted_proxies",
            "has no effect without proxy_protocol",
        ),
        (
            "listen: [{transport: tcp, address: 0.0.0.0, port: 3478, proxy_protocol: true, "
            "trusted_proxies: [10.0.0.300]}]",
            "listen[0].trusted_proxies[0]",
            "must be an IP address, a CIDR network",
        ),
        (
            "listen: [{transport: auto, address: 0.0.0.0, port: 443}]",
            "tls.certificate",
            "is required by the auto listener listen[0]",
        ),
    ],
)
def test_bad_values_are_rejected_naming_the_file_and_the_key_path(
    tmp_path: Path, text: str, path: str, fragment: str
) -> None:
    error = config_error(tmp_path, text + "\n")
    assert error.path == path
    assert str(error).startswith(f"{error.source}: {path}: ")
    assert fragment in str(error)


def test_the_bad_integer_message_has_the_documented_form(tmp_path: Path) -> None:
    path = write(tmp_path, "relay:\n  min_port: abc\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"{path}: relay.min_port: must be an integer between 1 and 65535, got 'abc'"
    )


def test_parse_config_names_the_given_source_or_a_placeholder() -> None:
    with pytest.raises(ConfigError, match=r"^conf/x\.yaml: workers: "):
        parse_config({"workers": "many"}, "conf/x.yaml")
    with pytest.raises(ConfigError, match=r"^<config>: workers: "):
        parse_config({"workers": "many"})


def test_the_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    error = config_error(tmp_path, "- realm: x\n")
    assert "top level must be a mapping, got a list" in str(error)
    assert error.path == ""


def test_long_bad_values_are_shortened_in_messages(tmp_path: Path) -> None:
    error = config_error(tmp_path, f"workers: {'9' * 200}x\n")
    assert len(str(error)) < 200
    assert str(error).endswith("...")


# --------------------------------------------------------------------------- cross-field rules


def test_min_port_above_max_port_is_rejected(tmp_path: Path) -> None:
    error = config_error(tmp_path, "relay: {min_port: 60000, max_port: 50000}\n")
    assert error.path == "relay.min_port"
    assert "must not exceed max_port (60000 > 50000)" in str(error)


def test_a_single_port_relay_range_is_allowed(tmp_path: Path) -> None:
    config = load_text(tmp_path, "relay: {min_port: 50000, max_port: 50000}\n")
    assert config.relay.min_port == config.relay.max_port == 50000


def test_max_lifetime_below_default_lifetime_is_rejected(tmp_path: Path) -> None:
    error = config_error(tmp_path, "allocations: {default_lifetime: 600, max_lifetime: 300}\n")
    assert error.path == "allocations.max_lifetime"
    assert "must be >= default_lifetime (300 < 600)" in str(error)


def test_an_external_ipv6_address_requires_an_ipv6_relay_address(tmp_path: Path) -> None:
    error = config_error(tmp_path, "relay: {external_address6: '2001:db8::1'}\n")
    assert error.path == "relay.external_address6"
    assert "requires address6" in str(error)


def test_more_relay_addresses_parse_with_their_external_addresses() -> None:
    config = parse_config(
        {
            "relay": {
                "address": "10.0.0.2",
                "address6": "2001:db8::2",
                "more_addresses": [
                    {"address": "10.0.0.3", "external_address": "203.0.113.3"},
                    {"address": "2001:db8::3"},
                ],
            }
        }
    )
    assert config.relay.bind_addresses(4) == ("10.0.0.2", "10.0.0.3")
    assert config.relay.bind_addresses(6) == ("2001:db8::2", "2001:db8::3")
    assert config.relay.more_of(4)[0].external_address == "203.0.113.3"


def test_a_proxy_protocol_listener_parses_its_trusted_networks() -> None:
    config = parse_config(
        {
            "listen": [
                {
                    "transport": "tcp",
                    "address": "0.0.0.0",
                    "port": 3478,
                    "proxy_protocol": True,
                    "trusted_proxies": ["10.0.0.0/8", "192.0.2.1-192.0.2.2", "::1"],
                }
            ]
        }
    )
    networks = config.listen[0].trusted_networks()
    assert networks is not None
    assert [str(n) for n in networks] == ["10.0.0.0/8", "192.0.2.1/32", "192.0.2.2/32", "::1/128"]
    assert parse_config({}).listen[0].trusted_networks() is None


def test_stun_urls_parse_with_the_default_port() -> None:
    assert parse_stun_url("stun:stun.example.org") == ("stun.example.org", 3478)
    assert parse_stun_url("stun:192.0.2.1:19302") == ("192.0.2.1", 19302)
    assert parse_stun_url("stun:[2001:db8::1]:3479") == ("2001:db8::1", 3479)
    config = parse_config({"relay": {"external_address": "auto", "discover": ["stun:192.0.2.1"]}})
    assert config.relay.discovered() == (4,)
    assert config.relay.fixed_external(4) is None


def test_a_tls_listener_without_a_certificate_is_rejected(tmp_path: Path) -> None:
    error = config_error(
        tmp_path,
        """
        listen:
          - {transport: udp, address: 0.0.0.0, port: 3478}
          - {transport: tls, address: 0.0.0.0, port: 5349}
        """,
    )
    assert error.path == "tls.certificate"
    assert "is required by the tls listener listen[1]" in str(error)


def test_a_tls_listener_without_a_private_key_is_rejected(tmp_path: Path) -> None:
    error = config_error(
        tmp_path,
        """
        listen: [{transport: tls, address: 0.0.0.0, port: 5349}]
        tls: {certificate: /etc/pyturn/cert.pem}
        """,
    )
    assert error.path == "tls.private_key"


def test_a_tls_listener_with_certificate_and_key_is_accepted(tmp_path: Path) -> None:
    config = load_text(
        tmp_path,
        """
        listen: [{transport: tls, address: "::", port: 5349}]
        tls: {certificate: /c.pem, private_key: /k.pem}
        """,
    )
    assert config.listen == (Listener("tls", "::", 5349),)
    assert config.tls == TlsConfig("/c.pem", "/k.pem")


def test_a_certificate_without_a_tls_listener_is_allowed(tmp_path: Path) -> None:
    config = load_text(tmp_path, "tls: {certificate: /c.pem}\n")
    assert config.tls.certificate == "/c.pem"


def test_two_listeners_on_the_same_socket_are_rejected(tmp_path: Path) -> None:
    error = config_error(
        tmp_path,
        """
        listen:
          - {transport: tcp, address: "::", port: 3478}
          - {transport: udp, address: "::", port: 3478}
          - {transport: tls, address: "0:0::0", port: 3478}
        tls: {certificate: /c.pem, private_key: /k.pem}
        """,
    )
    assert error.path == "listen[2]"
    assert "same address and port as listen[0]" in str(error)


def test_several_listeners_on_port_zero_are_allowed(tmp_path: Path) -> None:
    config = load_text(
        tmp_path,
        """
        listen:
          - {transport: udp, address: 127.0.0.1, port: 0}
          - {transport: udp, address: 127.0.0.1, port: 0}
        """,
    )
    assert [listener.port for listener in config.listen] == [0, 0]


# --------------------------------------------------------------------------- users


def test_a_user_given_as_a_string_has_that_password(tmp_path: Path) -> None:
    config = load_text(tmp_path, "auth: {users: {alice: 'secret pw'}}\n")
    assert config.auth.users == {"alice": UserEntry(password="secret pw")}


def test_a_user_may_also_be_given_as_a_password_mapping(tmp_path: Path) -> None:
    config = load_text(tmp_path, "auth: {users: {alice: {password: pw}}}\n")
    assert config.auth.users["alice"] == UserEntry(password="pw", key=None)


@pytest.mark.parametrize(
    "written", [KEY_HEX, "0x" + KEY_HEX, "0X" + KEY_HEX.upper(), KEY_HEX.upper()]
)
def test_a_user_key_is_hex_with_an_optional_0x_prefix(tmp_path: Path, written: str) -> None:
    config = load_text(tmp_path, f"auth: {{users: {{bob: {{key: '{written}'}}}}}}\n")
    assert config.auth.users["bob"] == UserEntry(key=bytes.fromhex(KEY_HEX))


@pytest.mark.parametrize(
    "written",
    [
        "'0123'",  # too short
        f"'{KEY_HEX}00'",  # too long
        f"'{KEY_HEX[:-1]}g'",  # not hex
        "'0x 0123456789abcdef0123456789abcde'",  # space inside
        f"0x{KEY_HEX}",  # unquoted: YAML reads it as an integer
        "''",
    ],
)
def test_a_bad_user_key_is_rejected_without_echoing_it(tmp_path: Path, written: str) -> None:
    error = config_error(tmp_path, f"auth: {{users: {{bob: {{key: {written}}}}}}}\n")
    assert error.path == "auth.users.bob.key"
    assert "32 hex digits" in str(error)
    assert "0123" not in str(error)


@pytest.mark.parametrize(
    ("text", "path", "fragment"),
    [
        ("{alice: {}}", "auth.users.alice", "exactly one of 'password' and 'key'"),
        (
            f"{{alice: {{password: pw, key: '{KEY_HEX}'}}}}",
            "auth.users.alice",
            "exactly one of 'password' and 'key'",
        ),
        ("{alice: ''}", "auth.users.alice.password", "must be a non-empty string"),
        ("{alice: 12345}", "auth.users.alice", "got an int"),
        ("{alice: [pw]}", "auth.users.alice", "got a list"),
        ("{'': pw}", "auth.users", "keys must be non-empty strings, got ''"),
        ("{42: pw}", "auth.users", "keys must be non-empty strings, got 42"),
        ("[alice]", "auth.users", "must be a mapping, got a list"),
    ],
)
def test_bad_users_are_rejected_naming_the_user(
    tmp_path: Path, text: str, path: str, fragment: str
) -> None:
    error = config_error(tmp_path, f"auth: {{users: {text}}}\n")
    assert error.path == path
    assert fragment in str(error)


def test_a_password_of_the_wrong_type_is_not_echoed(tmp_path: Path) -> None:
    error = config_error(tmp_path, "auth: {users: {alice: {password: 98765}}}\n")
    assert error.path == "auth.users.alice.password"
    assert "98765" not in str(error)
    assert "got an int" in str(error)


# ------------------------------------------------------------------ round trip and redaction


@pytest.mark.parametrize("config", [default_config(), fully_customised()], ids=["default", "full"])
def test_config_to_dict_without_redaction_round_trips_through_parse_config(
    config: Config,
) -> None:
    assert parse_config(config_to_dict(config, redact=False)) == config


def test_config_to_dict_round_trips_through_yaml_text(tmp_path: Path) -> None:
    config = fully_customised()
    text = yaml.safe_dump(config_to_dict(config, redact=False), sort_keys=False)
    assert load_config(write(tmp_path, text)) == config


def test_fully_customised_config_differs_from_the_default_in_every_field() -> None:
    default, custom = default_config(), fully_customised()
    for field in dataclasses.fields(Config):
        assert getattr(default, field.name) != getattr(custom, field.name), field.name


def test_config_to_dict_gives_plain_data_in_schema_order() -> None:
    data = config_to_dict(fully_customised(), redact=False)
    assert list(data) == [field.name for field in dataclasses.fields(Config)]
    plain = {"proxy_protocol": False, "trusted_proxies": []}
    assert data["listen"] == [
        {"transport": "udp", "address": "192.0.2.10", "port": 3478, **plain},
        {"transport": "tcp", "address": "2001:db8::10", "port": 3478, **plain},
        {"transport": "tls", "address": "::", "port": 5349, **plain},
        {"transport": "udp", "address": "127.0.0.1", "port": 0, **plain},
    ]
    assert data["auth"] == {
        "users": {"alice": "correct horse", "bob": {"key": KEY_HEX}},
        "secrets": ["new-secret", "old-secret"],
        "nonce_lifetime": 300,
        "end_expired_sessions": True,
        "secure_stun": True,
        "secret_files": [],
        "secret_env": [],
        "rest_separator": "-",
    }
    assert data["peers"] == {"allow": ["10.1.0.0/16", "fd00::1"], "deny": ["198.51.100.0/24"]}
    assert data["shutdown_timeout"] == 2.5


def test_config_to_dict_redacts_passwords_keys_and_secrets_by_default() -> None:
    data = config_to_dict(fully_customised())
    assert data["auth"] == {
        "users": {"alice": REDACTED, "bob": {"key": REDACTED}},
        "secrets": [REDACTED, REDACTED],
        "nonce_lifetime": 300,
        "end_expired_sessions": True,
        "secure_stun": True,
        "secret_files": [],
        "secret_env": [],
        "rest_separator": "-",
    }
    text = yaml.safe_dump(data)
    for secret in ("correct horse", KEY_HEX, "new-secret", "old-secret"):
        assert secret not in text
    assert "example.org" in text
    assert "/etc/pyturn/key.pem" in text


def test_redaction_keeps_unset_secrets_visible_as_empty() -> None:
    data = config_to_dict(default_config())
    assert data["auth"] == {
        "users": {},
        "secrets": [],
        "nonce_lifetime": 600,
        "end_expired_sessions": False,
        "secure_stun": False,
        "secret_files": [],
        "secret_env": [],
        "rest_separator": ":",
    }


# --------------------------------------------------------------------------- files and YAML


def test_a_missing_file_is_a_config_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match="cannot read config file") as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: ")


def test_a_directory_is_a_config_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path))
    assert str(info.value).startswith(f"{tmp_path}: cannot read config file")


def test_a_yaml_syntax_error_is_a_config_error_naming_the_file_and_line(
    tmp_path: Path,
) -> None:
    error = config_error(tmp_path, "realm: x\nrelay:\n  min_port: [1, 2\n")
    assert "invalid YAML" in str(error)
    assert "line " in str(error)


def test_a_tab_indented_file_is_a_config_error(tmp_path: Path) -> None:
    error = config_error(tmp_path, "relay:\n\tmin_port: 1\n")
    assert "invalid YAML" in str(error)


def test_duplicate_keys_are_a_config_error_naming_the_line(tmp_path: Path) -> None:
    error = config_error(tmp_path, "relay: {min_port: 50000}\nrealm: x\nrelay: {max_port: 60000}\n")
    assert "line 3" in str(error)
    assert "duplicate key 'relay'" in str(error)


def test_yaml_merge_keys_are_not_mistaken_for_duplicates(tmp_path: Path) -> None:
    config = load_text(
        tmp_path,
        """
        listen:
          - &base {transport: udp, address: 0.0.0.0, port: 3478}
          - {<<: *base, transport: tcp}
        """,
    )
    assert config.listen == default_config().listen


def test_invalid_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "x.yaml"
    path.write_bytes(b"realm: \xff\n")
    with pytest.raises(ConfigError, match="not valid UTF-8"):
        load_config(path)


def test_unsafe_yaml_tags_are_refused(tmp_path: Path) -> None:
    error = config_error(tmp_path, "realm: !!python/object/apply:os.getcwd []\n")
    assert "invalid YAML" in str(error)


def test_load_config_accepts_str_and_path_objects(tmp_path: Path) -> None:
    path = write(tmp_path, "realm: example.org\n")
    assert load_config(path).realm == load_config(str(path)).realm == "example.org"


def test_config_errors_survive_pickling_with_their_attributes() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"workers": -1}, "conf/x.yaml")
    copy = pickle.loads(pickle.dumps(info.value))  # noqa: S301 - our own object
    assert str(copy) == str(info.value)
    assert (copy.source, copy.path) == ("conf/x.yaml", "workers")


# --------------------------------------------------------------------------- split_host_port


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("192.0.2.1:3478", ("192.0.2.1", 3478)),
        ("[2001:db8::1]:5349", ("2001:db8::1", 5349)),
        ("[::1]:65535", ("::1", 65535)),
    ],
)
def test_split_host_port_accepts_ip_literals(text: str, expected: tuple[str, int]) -> None:
    assert split_host_port(text) == expected


@pytest.mark.parametrize(
    "text",
    ["192.0.2.1", "::1:3478", "[192.0.2.1]:3478", "host:3478", "192.0.2.1:70000", "[::1]:x"],
)
def test_split_host_port_rejects_everything_else(text: str) -> None:
    with pytest.raises(ValueError, match=r"."):
        split_host_port(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (0, 0),
        (None, 0),
        (125_000, 125_000),
        ("2 Mbit/s", 250_000),
        ("2Mbit/s", 250_000),
        ("500 kB/s", 500_000),
        ("1 Gbps", 125_000_000),
        ("64 kb/s", 8_000),
        ("1.5 MB/s", 1_500_000),
        ("10 KiB/s", 10_240),
        ("1 MiB/s", 1_048_576),
        ("800 bit/s", 100),
    ],
)
def test_bandwidth_rates_read_in_bytes_per_second(text: object, expected: int) -> None:
    config = parse_config({"bandwidth": {"per_allocation": text, "total": text}})
    assert config.bandwidth.per_allocation == expected
    assert config.bandwidth.total == expected


@pytest.mark.parametrize(
    "value", [-1, "fast", "2 parsecs", "2 Mbit", "Mbit/s", 1.5, True, "-2 Mbit/s", 10**13, [1]]
)
def test_bad_bandwidth_rates_are_refused_naming_the_key(value: object) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"bandwidth": {"per_user": value}})
    assert caught.value.path == "bandwidth.per_user"
    assert "must be a rate" in str(caught.value)


def test_a_narrower_bandwidth_limit_above_a_wider_one_is_warned_about() -> None:
    config = parse_config(
        {"bandwidth": {"per_allocation": "4 Mbit/s", "per_user": "2 Mbit/s", "total": "3 Mbit/s"}}
    )
    assert config_warnings(config) == [
        "bandwidth.per_allocation (500000 B/s) is above bandwidth.per_user (250000 B/s):"
        " it can never be reached",
        "bandwidth.per_allocation (500000 B/s) is above bandwidth.total (375000 B/s):"
        " it can never be reached",
    ]
    fine = parse_config({"bandwidth": {"per_allocation": "2 Mbit/s", "total": "1 Gbit/s"}})
    assert config_warnings(fine) == []


# --------------------------------------------------------------------------- secrets kept outside


def test_secrets_come_from_files_and_the_environment_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mounted = tmp_path / "turn-secret"
    mounted.write_text("from-a-file\n\nand-its-second-line\n")
    monkeypatch.setenv("TURN_SECRET", "from-the-environment")
    config = load_text(
        tmp_path,
        f"""
        auth:
          secrets: [in-the-file, from-a-file]
          secret_files: [{mounted}]
          secret_env: [TURN_SECRET]
        """,
    )
    assert config.auth.secrets == (
        "in-the-file",
        "from-a-file",
        "and-its-second-line",
        "from-the-environment",
    )
    # What a worker gets from its supervisor parses to the same secrets.
    again = parse_config(config_to_dict(config, redact=False))
    assert again.auth.secrets == config.auth.secrets
    assert "from-a-file" not in yaml.safe_dump(config_to_dict(config))


@pytest.mark.parametrize(
    ("auth", "problem"),
    [
        ("secret_files: [/nonexistent/turn-secret]", r"auth\.secret_files\[0\]: /nonexistent"),
        ("secret_files: [relative/path]", r"auth\.secret_files\[0\].*absolute path"),
        ("secret_env: [PYTURN_TEST_UNSET]", r"auth\.secret_env\[0\]: \$PYTURN_TEST_UNSET is not"),
    ],
)
def test_a_secret_that_cannot_be_read_is_an_error_naming_it(
    tmp_path: Path, auth: str, problem: str
) -> None:
    with pytest.raises(ConfigError, match=problem):
        load_text(tmp_path, f"auth:\n  {auth}\n")
