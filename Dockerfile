# pyturn in a container. Run it with host networking (see README.md, "Docker"):
#   docker build -t pyturn .
#   docker run --network host -v /etc/pyturn:/etc/pyturn:ro pyturn
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY pyturn ./pyturn
RUN pip install . && rm -rf /src \
    && useradd --system --no-create-home --shell /usr/sbin/nologin pyturn \
    && mkdir -p /etc/pyturn
COPY conf/pyturn.yaml /etc/pyturn/pyturn.yaml

USER pyturn
WORKDIR /
EXPOSE 3478/udp 3478/tcp 5349/tcp 9641/tcp
# Config is mounted at /etc/pyturn; the image's copy is the commented example.
ENTRYPOINT ["pyturn"]
CMD ["serve", "-c", "/etc/pyturn/pyturn.yaml"]
