# The sidecar image: `outrigger-proxy` runs both as the init container (`init`, as root with
# NET_ADMIN, which needs iptables) and as the sidecar (`sidecar`, as UID 1337).
# Build from the repository root:
#   docker build -f deploy/proxy.Dockerfile -t outrigger/proxy:0.1.0 .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# Profile-guided optimization: scripts/pgo builds the proxy instrumented, serves h2load's HTTP/1.1
# and HTTP/2 load through it to nginx (installed here, in the build stage only), and merges the
# counts. The build after it lays out and inlines the code for the paths requests take: about a
# quarter fewer instructions per request (docs/benchmarks.md).
RUN scripts/pgo --profile-only
RUN RUSTFLAGS="-Cprofile-use=/src/target/pgo/proxy.profdata" \
    cargo build --release --locked -p outrigger-proxy

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
