# The consortium's coordinator: no libtorch, a small image.
#   docker build -f deploy/docker/coordinator.Dockerfile -t aln-coordinator .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release -p coordinator

FROM debian:bookworm-slim
RUN useradd --system --home /var/lib/aln aln && mkdir -p /var/lib/aln && chown aln /var/lib/aln
COPY --from=build /src/target/release/coordinator /usr/local/bin/coordinator
USER aln
WORKDIR /var/lib/aln
# Mount the coordinator kit (coordinator.toml, certificates, initial model) at /var/lib/aln/kit.
EXPOSE 50051
ENTRYPOINT ["coordinator"]
CMD ["run", "--config", "/var/lib/aln/kit/coordinator.toml", "--log-format", "json"]
