# syntax=docker/dockerfile:1
# Xoogify images, built by compose.yaml (docs/deploy.md):
#   target `service`: gateway, scheduler, migrate, nats-config, subscriber-stream;
#   target `runner` (the default, last stage): the same plus OpenTofu for `terraform` jobs.
# Both run as the unprivileged user `xoogify` (uid 10001). Build for another architecture
# with `docker buildx build --platform linux/arm64 --target runner .`.

ARG PYTHON_VERSION=3.11
ARG TOFU_VERSION=1.11.6

FROM python:${PYTHON_VERSION}-slim-bookworm AS base
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Dependencies and the project in a virtualenv. Editable on purpose: services/common/config.py
# finds schemas/, web/ and examples/ beside services/, so the code stays in /app instead of
# being copied into site-packages.
FROM base AS build
WORKDIR /app
RUN python -m venv /opt/xoogify
COPY pyproject.toml README.md ./
COPY services ./services
RUN /opt/xoogify/bin/pip install -e /app \
    && /opt/xoogify/bin/python -m compileall -q /app/services

# The `tofu` binary only (a static Go binary, one per architecture of the target platform).
FROM ghcr.io/opentofu/opentofu:${TOFU_VERSION}-minimal AS tofu

FROM base AS service
# The home holds what the services write: the nats-config output (a volume initialised
# from this directory, so it is owned by xoogify), Terraform's plugin cache.
RUN groupadd --system --gid 10001 xoogify \
    && useradd --system --uid 10001 --gid xoogify --create-home \
       --home-dir /var/lib/xoogify --shell /usr/sbin/nologin xoogify \
    && mkdir -p /var/lib/xoogify/nats-config \
    && chown -R xoogify:xoogify /var/lib/xoogify
COPY --from=build /opt/xoogify /opt/xoogify
COPY --from=build /app /app
COPY schemas /app/schemas
COPY web /app/web
COPY examples /app/examples
ENV PATH=/opt/xoogify/bin:$PATH \
    XOOGIFY_MODULES_DIR=/app/examples/modules
WORKDIR /var/lib/xoogify
USER 10001:10001
EXPOSE 8000
ENTRYPOINT ["xoogify"]
CMD ["gateway", "--host", "0.0.0.0", "--port", "8000"]

FROM service AS runner
COPY --from=tofu /usr/local/bin/tofu /usr/local/bin/tofu
# No Terraform version check against the internet; modules come from a mounted folder.
ENV CHECKPOINT_DISABLE=1 \
    XOOGIFY_MODULES_DIR=/srv/xoogify/modules
CMD ["runner"]
