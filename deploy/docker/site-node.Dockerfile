# A hospital's site-node with PyTorch 2.13.0 (CUDA-capable wheels from PyPI; runs on CPU
# without a GPU, on CUDA with `--gpus all`).
#   docker build -f deploy/docker/site-node.Dockerfile -t aln-site-node .
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends python3-venv && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/torch && /opt/torch/bin/pip install --no-cache-dir torch==2.13.0
ENV PATH=/opt/torch/bin:$PATH LIBTORCH_USE_PYTORCH=1
WORKDIR /src
COPY . .
RUN cargo build --release -p site-node

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends python3 libgomp1 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --home /var/lib/aln aln && mkdir -p /var/lib/aln && chown aln /var/lib/aln
COPY --from=build /opt/torch /opt/torch
COPY --from=build /src/target/release/site-node /usr/local/bin/site-node
ENV LD_LIBRARY_PATH=/opt/torch/lib/python3.11/site-packages/torch/lib
USER aln
WORKDIR /var/lib/aln
# Mount the site kit at /var/lib/aln/kit and the manifest + images read-only at /data.
ENTRYPOINT ["site-node"]
CMD ["run", "--config", "/var/lib/aln/kit/site.toml", "--manifest", "/data/manifest.csv", "--work-dir", "/var/lib/aln/work", "--log-format", "json"]
