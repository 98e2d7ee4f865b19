# kongflow-events: one image for every role (serve, relay, worker, migrate, topology).
#
#   docker build -t kongflow-events .
#
# The build uses the committed query data in .sqlx/ (no database needed) and the same
# command, features and profile as CI's release build: `cargo build --release --locked`.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-slim-bookworm AS build
WORKDIR /src
ENV SQLX_OFFLINE=true CARGO_TERM_COLOR=never
# Dependencies first, in a layer of their own: it is rebuilt only when Cargo.toml or
# Cargo.lock change.
COPY Cargo.toml Cargo.lock build.rs ./
RUN mkdir -p src benches/common \
 && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
 && for b in pipeline delays tiers; do echo 'fn main() {}' > "benches/$b.rs"; done \
 && mkdir migrations \
 && cargo build --release --locked \
 && rm -rf src benches migrations
# Then the service itself.
COPY .sqlx ./.sqlx
COPY migrations ./migrations
COPY api ./api
COPY benches ./benches
COPY src ./src
RUN touch src/main.rs src/lib.rs && cargo build --release --locked

# The runtime: the binary and the migrations, no shell, no package manager, not root.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/kongflow-events /usr/local/bin/kongflow-events
COPY --from=build /src/migrations /migrations
USER nonroot:nonroot
EXPOSE 3030 9464
ENTRYPOINT ["/usr/local/bin/kongflow-events"]
CMD ["all", "--http", "0.0.0.0:3030"]
