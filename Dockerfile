# invoice-relay container image.
#
# The base is pinned by its full version tag. Where you can pull, pin it by digest too
# (python:3.12.8-slim-bookworm@sha256:...) so a rebuild gets the very same layers.

# --- build: turn the source tree into one wheel ---------------------------------------
FROM python:3.12.8-slim-bookworm AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /src
COPY pyproject.toml README.md alembic.ini ./
COPY worker/ worker/
COPY migrations/ migrations/
RUN pip wheel --no-deps --wheel-dir /wheels .

# --- run: the wheel and its dependencies, nothing else --------------------------------
FROM python:3.12.8-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    INVOICE_RELAY_DATABASE_URL=sqlite:////data/invoice-relay.db \
    INVOICE_RELAY_HTTP_PORT=8080

# A fixed, unprivileged uid/gid, so volume ownership is the same on every host.
RUN groupadd --gid 10001 relay \
    && useradd --uid 10001 --gid relay --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin relay \
    && mkdir /data \
    && chown relay:relay /data

COPY --from=builder /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl \
    && rm -rf /wheels

# Ownership is set above: changes made to a volume path after VOLUME are discarded.
VOLUME /data
WORKDIR /data
# The probes (INVOICE_RELAY_HTTP_PORT) and the status page (INVOICE_RELAY_WEB_PORT's
# default). Publish only 8081, behind a reverse proxy with TLS; keep 8080 private.
EXPOSE 8080 8081

USER 10001:10001

# `healthcheck` asks the local /livez, so the image needs no curl.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["invoice-relay", "healthcheck"]

ENTRYPOINT ["invoice-relay"]
CMD ["run"]
