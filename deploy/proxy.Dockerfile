# The sidecar image: `outrigger-proxy` runs both as the init container (`init`, as root with
# NET_ADMIN, which needs iptables) and as the sidecar (`sidecar`, as UID 1337).
# Build from the repository root:
#   docker build -f deploy/proxy.Dockerfile -t outrigger/proxy:0.1.0 .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p outrigger-proxy

FROM debian:bookworm-slim
# iptables brings both backends (nft and legacy); nothing else is installed.
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 1337 --no-create-home --shell /usr/sbin/nologin outrigger
COPY --from=build /src/target/release/outrigger-proxy /usr/local/bin/outrigger-proxy
USER 1337
ENTRYPOINT ["/usr/local/bin/outrigger-proxy"]
CMD ["--help"]
