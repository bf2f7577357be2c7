# One image for every role of the farm: watcher, worker, image server and flower.
FROM python:3.11-slim-bookworm
RUN apt-get update \
    && apt-get install -y --no-install-recommends xorriso cpio zstd mtools \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY builder builder
COPY templates templates
COPY worker worker
COPY watcher watcher
COPY server server
RUN pip install --no-cache-dir . && useradd --uid 1001 --no-create-home ppimage
USER 1001
ENTRYPOINT ["ppimage"]
