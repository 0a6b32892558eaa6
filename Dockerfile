# pyturn in a container. Run it with host networking (see README.md, "Docker"):
#   docker build -t pyturn .
#   docker run -d --name pyturn --network host --stop-timeout 45 \
#       -v /etc/pyturn:/etc/pyturn:ro pyturn
# Reload the config: docker kill --signal HUP pyturn. Drain and stop: docker stop pyturn.
# Live sessions: docker exec pyturn pyturn sessions (also kick, revoke, reload, drain).
# Revocations are kept in /var/lib/pyturn: mount a volume there to keep them across
# containers (or use a Redis store).

# Build stage: the wheel, with the recvmmsg/sendmmsg module compiled (hatch_build.py).
FROM python:3.11-slim AS build
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md hatch_build.py ./
COPY pyturn ./pyturn
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY --from=build /wheels /wheels
# The import check fails the build if the batching module did not make it into the image.
# A fixed numeric UID, so Kubernetes' runAsNonRoot can check it.
RUN pip install /wheels/pyturn-*.whl && rm -rf /wheels \
    && python -c "from pyturn.net import batch; assert batch.NATIVE, batch.describe()" \
    && useradd --system --uid 10001 --user-group --no-create-home \
        --shell /usr/sbin/nologin pyturn \
    && mkdir -p /etc/pyturn \
    && install -d -o 10001 -g 10001 -m 0750 /run/pyturn /var/lib/pyturn
# The commented example (every key at its default); mount your own over /etc/pyturn.
COPY conf/pyturn.yaml /etc/pyturn/pyturn.yaml

USER 10001:10001
WORKDIR /
# STUN/TURN over UDP and TCP, TLS, and the metrics/health endpoint. With
# --network host these are documentation only; the relay range is not listed on purpose.
EXPOSE 3478/udp 3478/tcp 5349/tcp 9641/tcp
# SIGTERM drains (up to shutdown_timeout, 30 s by default): give `docker stop` longer
# than that (--stop-timeout 45 above), or it kills pyturn after its default 10 s.
STOPSIGNAL SIGTERM
# /live answers while the event loop runs; it needs metrics enabled on 127.0.0.1:9641
# (the default). Change or drop this line if you move or disable metrics.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:9641/live', timeout=4)"]
ENTRYPOINT ["pyturn"]
CMD ["serve", "-c", "/etc/pyturn/pyturn.yaml"]
