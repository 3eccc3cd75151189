# Build: docker build -t verve .
# Run:   docker run --network host verve
# Configure with VERVE_* environment variables (see docs/configuration.md).

FROM rust:1-slim-bookworm AS build
# librdkafka (the Kafka sink) is built from source: it needs make and a C++ compiler.
RUN apt-get update && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# The dependencies first, in a layer of their own, built against stub sources:
# an edit to verve (or its docs) then rebuilds verve alone, not the ~160 crates
# under it. The stubs' own build of verve is dropped, so the real one is built.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches \
    && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && for bench in hot_path set_growth ingest; do echo 'fn main() {}' > "benches/$bench.rs"; done \
    && cargo build --release --locked --bin verve \
    && rm -rf src benches target/release/verve target/release/.fingerprint/verve-* \
        target/release/deps/verve-* target/release/deps/libverve-*
COPY . .
# Debug info is for profiling on a build host; symbols stay for backtraces.
RUN cargo build --release --locked --bin verve \
    && strip --strip-debug target/release/verve

FROM debian:bookworm-slim
# The logs and data directories are verve's in the image, so that a volume
# mounted on either (or on /var/lib/verve) starts writable.
RUN useradd --system --uid 10001 --home-dir /var/lib/verve --create-home verve \
    && install -d -o verve -g verve /var/lib/verve/logs /var/lib/verve/data
COPY --from=build /src/target/release/verve /usr/local/bin/verve
USER verve
WORKDIR /var/lib/verve
ENV VERVE_ADDR=0.0.0.0:8080 \
    VERVE_COUNT_LOG=/var/lib/verve/logs/unique-requests.log \
    VERVE_DATA_DIR=/var/lib/verve/data
# The journal: keep it across restarts (docker run -v verve-data:/var/lib/verve/data).
VOLUME /var/lib/verve/data
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/verve"]
