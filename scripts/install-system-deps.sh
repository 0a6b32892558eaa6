#!/bin/sh
# Installs the Debian packages the test suite uses: coturn, for its client tools
# (turnutils_stunclient, turnutils_uclient, turnutils_peer, turnadmin) and its server,
# which benchmarks run side by side with pyturn; redis-server, the Redis the store
# tests start on a loopback port; and prometheus (with promtool), which a test runs
# against a pyturn with deploy/prometheus's rules; and chromium, the headless browser the
# status and test page tests drive; and haproxy and nginx (with its stream module),
# which tests put in front of pyturn with the PROXY protocol and ALPN routing; and
# libssl-dev, the OpenSSL headers and library the benchmark's load generator
# (bench/loadgen.c, built with the C compiler, which is assumed present) links for its
# TLS clients. Nothing here is shipped with pyturn.
set -eu

missing=""
command -v turnutils_uclient >/dev/null 2>&1 || missing="$missing coturn"
command -v redis-server >/dev/null 2>&1 || missing="$missing redis-server"
command -v promtool >/dev/null 2>&1 || missing="$missing prometheus"
command -v chromium >/dev/null 2>&1 || missing="$missing chromium"
command -v haproxy >/dev/null 2>&1 || missing="$missing haproxy"
[ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || missing="$missing nginx-light libnginx-mod-stream"
[ -e /usr/include/openssl/ssl.h ] || missing="$missing libssl-dev"
if [ -z "$missing" ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-system-deps: no apt-get; install$missing by hand" \
         "or the interop tests will be skipped" >&2
    exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
        echo "install-system-deps: not root and no sudo; interop tests will be skipped" >&2
        exit 0
    fi
fi
echo "install-system-deps: installing$missing (for the interop tests)" >&2
$SUDO apt-get update -qq
# shellcheck disable=SC2086 # the package names are meant to split
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
