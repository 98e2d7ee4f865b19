# kongflow-events: one image for every role (serve, relay, worker, ingest, migrate, topology).
#
#   docker build -t kongflow-events .        (or: buildah bud -t kongflow-events .)
#   scripts/image.sh build                    (here, with base images made from Debian's packages)
#
# The build uses the committed query data in .sqlx/ (no database needed) and the same
# command, features and profile as CI's release build: `cargo build --release --locked`.
# The bases are build arguments, defaulting to the public images; scripts/image.sh passes
# local ones made from Debian's packages where no registry can be reached.

ARG RUST_VERSION=1.95
ARG BUILD_IMAGE=docker.io/library/rust:${RUST_VERSION}-slim-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${BUILD_IMAGE} AS build
WORKDIR /src
ENV SQLX_OFFLINE=true CARGO_TERM_COLOR=never
# Dependencies first, in a layer of their own: it is rebuilt only when Cargo.toml or
# Cargo.lock change. Every target Cargo.toml names gets a stub, so the manifest parses.
COPY Cargo.toml Cargo.lock build.rs ./
RUN mkdir -p src benches migrations \
 && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
 && for b in $(grep -o 'benches/[a-z_]*\.rs' Cargo.toml) \
             $(sed -n '/^\[\[bench\]\]/,/^$/s/^name = "\(.*\)"/benches\/\1.rs/p' Cargo.toml); do \
      echo 'fn main() {}' > "$b"; done \
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
FROM ${RUNTIME_IMAGE}
COPY --from=build /src/target/release/kongflow-events /usr/local/bin/kongflow-events
COPY --from=build /src/migrations /migrations
USER nonroot:nonroot
EXPOSE 3030 9464
ENTRYPOINT ["/usr/local/bin/kongflow-events"]
CMD ["all", "--http", "0.0.0.0:3030"]
