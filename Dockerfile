# Capstan's image: every binary (capstan, capstan-orchestrator,
# capstan-scheduler, capstan-router-config, capstan-auth, capstan-metrics,
# capstan-gateway, capstan-agent),
# run as the unprivileged user `capstan` (uid 10001).
#
#   docker build -t capstan .                       # build from source
#   docker build --target prebuilt -f Dockerfile \
#     --build-arg RUNTIME_IMAGE=capstan-base:bookworm STAGE_DIR
#                                                   # binaries built on the host,
#                                                   # in STAGE_DIR/bin (the tests)
#
# Which service a container runs is its command, e.g. `capstan-orchestrator`;
# every flag also reads an environment variable (CAPSTAN_LISTEN, ...).
# The health check asks the service on CAPSTAN_LISTEN over grpc.health.v1.

ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${RUNTIME_IMAGE} AS runtime-base
# python3 runs the example apps on agents (and init.sh); curl: the
# vault-init job; ca-certificates: TLS to Vault, Consul and OTLP. A base
# that has them (infra/docker/base-image.sh) skips the download.
RUN if ! command -v python3 >/dev/null || ! command -v curl >/dev/null || [ ! -d /etc/ssl/certs ]; then \
      apt-get update && apt-get install -y --no-install-recommends python3 curl ca-certificates \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
 && groupadd --system --gid 10001 capstan \
 && useradd --system --uid 10001 --gid capstan --home-dir /var/lib/capstan/data \
      --shell /usr/sbin/nologin capstan \
 && mkdir -p /var/lib/capstan/data && chown capstan:capstan /var/lib/capstan/data \
 && chmod 0700 /var/lib/capstan/data
# The data dir is private to the platform; an agent's process apps work
# beside it, in /var/lib/capstan/work, and cannot enter it.
ENV CAPSTAN_DATA_DIR=/var/lib/capstan/data \
    CAPSTAN_LISTEN=0.0.0.0:7000
WORKDIR /var/lib/capstan/data
USER capstan
HEALTHCHECK --interval=5s --timeout=4s --start-period=30s --retries=3 CMD ["capstan", "health"]
CMD ["capstan", "--help"]

# Binaries built outside the image, in the build context's bin/.
FROM runtime-base AS prebuilt
COPY bin/ /usr/local/bin/

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bins \
 && mkdir -p /out/bin \
 && cp target/release/capstan target/release/capstan-orchestrator target/release/capstan-scheduler \
       target/release/capstan-router-config target/release/capstan-auth target/release/capstan-metrics \
       target/release/capstan-gateway target/release/capstan-agent /out/bin/

# The default target: built from source.
FROM runtime-base AS runtime
COPY --from=build /out/bin/ /usr/local/bin/
