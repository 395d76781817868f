# The control-plane image: one static-enough binary on a distroless base, as a non-root user.
# Build from the repository root:
#   docker build -f deploy/control-plane.Dockerfile -t outrigger/control-plane:0.1.0 .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p outrigger-control-plane

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/outrigger-control-plane /usr/local/bin/outrigger-control-plane
USER 65532
ENTRYPOINT ["/usr/local/bin/outrigger-control-plane"]
CMD ["--help"]
