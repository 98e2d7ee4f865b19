#!/usr/bin/env bash
# The container image, built here without a Docker engine and without a registry.
#
#   scripts/image.sh build   the image from the Dockerfile (buildah); prints its size and layers
#   scripts/image.sh test    build, then run the chart's containers in the image's root
#                            filesystem against the local Postgres and RabbitMQ (tests/it/image.rs)
#   scripts/image.sh bases   only the two base images, when missing
#
# The Dockerfile's `FROM` lines take build arguments that default to the real images
# (rust:*-slim-bookworm, gcr.io/distroless/cc-debian12). Where those cannot be pulled, as
# here, this script makes both locally from Debian's packages:
#   - the build base: `debootstrap --variant=minbase` (Debian 12) with gcc and libc6-dev,
#     and this machine's Rust toolchain (the one CI builds with) under /usr/local/rust;
#   - the runtime base, as distroless assembles its own: the files of libc6, libgcc-s1,
#     ca-certificates, tzdata, netbase and base-files, a passwd and group with root, nobody
#     and nonroot (65532), and nothing that runs: no shell, no package manager.
# IMAGE names the result (default localhost/kongflow-events:dev); PULL=1 uses the real bases.
set -euo pipefail
cd "$(dirname "$0")/.."
image=${IMAGE:-localhost/kongflow-events:dev}
rust=$(rustc --version | awk '{print $2}')
build_base=localhost/kongflow-build-base:rust-$rust
runtime_base=localhost/kongflow-runtime-base:bookworm
work=$PWD/target/image

need() { # need <command> <Debian package>
  command -v "$1" >/dev/null && return
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$2" >/dev/null
}

exists() { buildah inspect --type image "$1" >/dev/null 2>&1; }

# commit_dir <dir> <image> [buildah config arguments...]: an image whose one layer is <dir>.
commit_dir() {
  local dir=$1 name=$2 ctr mnt
  shift 2
  ctr=$(buildah from scratch)
  mnt=$(buildah mount "$ctr")
  cp -a "$dir"/. "$mnt"/
  buildah umount "$ctr" >/dev/null
  [ $# -gt 0 ] && buildah config "$@" "$ctr"
  buildah commit --quiet --rm "$ctr" "$name" >/dev/null
}

make_build_base() {
  exists "$build_base" && return
  echo "== making $build_base (debootstrap, then this machine's Rust $rust)"
  need debootstrap debootstrap
  local root=$work/build-root toolchain
  rm -rf "$root"
  debootstrap --variant=minbase --include=gcc,libc6-dev,ca-certificates bookworm "$root" \
    http://deb.debian.org/debian >"$work/debootstrap.log" 2>&1 ||
    { tail -20 "$work/debootstrap.log" >&2; exit 1; }
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  toolchain=$(rustc --print sysroot)
  mkdir -p "$root/usr/local/rust/bin" "$root/usr/local/cargo"
  cp -a "$toolchain/bin/cargo" "$toolchain/bin/rustc" "$root/usr/local/rust/bin/"
  cp -a "$toolchain/lib" "$root/usr/local/rust/"
  commit_dir "$root" "$build_base" \
    --env PATH=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env CARGO_HOME=/usr/local/cargo --workingdir /
  rm -rf "$root"
}

make_runtime_base() {
  exists "$runtime_base" && return
  echo "== making $runtime_base (files of Debian's libc6, libgcc-s1, ca-certificates, tzdata, netbase, base-files)"
  local root=$work/runtime-root debs=$work/debs p
  rm -rf "$root" "$debs"
  mkdir -p "$root" "$debs"
  apt-get update -qq
  (cd "$debs" && apt-get download -qq libc6 libgcc-s1 ca-certificates tzdata netbase base-files)
  for p in "$debs"/*.deb; do dpkg-deb -x "$p" "$root"; done
  # What the packages' scripts would have made: the CA bundle, the users, /tmp.
  mkdir -p "$root/etc/ssl/certs" "$root/tmp" "$root/home/nonroot" "$root/root"
  cat "$root"/usr/share/ca-certificates/mozilla/*.crt >"$root/etc/ssl/certs/ca-certificates.crt"
  printf '%s\n' 'root:x:0:0:root:/root:/sbin/nologin' \
    'nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin' \
    'nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin' >"$root/etc/passwd"
  printf '%s\n' 'root:x:0:' 'nobody:x:65534:' 'nonroot:x:65532:' >"$root/etc/group"
  chmod 1777 "$root/tmp"
  chown 65532:65532 "$root/home/nonroot"
  chmod 700 "$root/root"
  # Documentation and the packages' own scripts are not needed at run time.
  rm -rf "$root/usr/share/doc" "$root/usr/share/man" "$root/usr/share/lintian" "$root/usr/sbin" \
    "$root/usr/bin" "$root/sbin" "$root/bin" "$root/etc/update-motd.d"
  commit_dir "$root" "$runtime_base" --env PATH=/usr/local/bin:/usr/bin:/bin --workingdir /
  rm -rf "$root" "$debs"
}

bases() {
  need buildah buildah
  mkdir -p "$work"
  if [ "${PULL:-0}" = 1 ]; then
    args=()
  else
    make_build_base
    make_runtime_base
    args=(--build-arg "BUILD_IMAGE=$build_base" --build-arg "RUNTIME_IMAGE=$runtime_base")
  fi
}

build() {
  bases
  echo "== building $image"
  local start=$SECONDS
  # The build steps see this machine's CA bundle (its registries may sit behind a proxy
  # with a CA of its own) and its crate cache; neither becomes part of any layer.
  local cache=${CARGO_HOME:-$HOME/.cargo}/registry
  mkdir -p "$cache"
  buildah bud --isolation chroot --layers --quiet "${args[@]}" \
    --volume /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro \
    --volume "$cache:/usr/local/cargo/registry" \
    -t "$image" -f Dockerfile . >/dev/null
  echo "built in $((SECONDS - start)) s"
  # Its size, and its layers (the runtime base's, then the binary's and the migrations').
  buildah images --format '{{.Name}}:{{.Tag}} {{.Size}}' "$image"
  buildah inspect --type image --format '{{range .Docker.History}}{{.CreatedBy}}{{"\n"}}{{end}}' "$image" |
    sed 's/^/  layer: /'
}

case "${1:-build}" in
bases) bases ;;
build) build ;;
test)
  build
  # The image's root as a pod gets it: the image read-only, /proc, and the host's
  # /etc/hosts and /etc/resolv.conf (the kubelet mounts its own there). The mount points
  # are made in the working container's own layer, never in the image.
  ctr=$(buildah from "$image")
  ro=$work/rootfs
  cleanup() {
    for m in proc etc/resolv.conf etc/hosts ""; do umount "$ro/$m" 2>/dev/null || true; done
    buildah umount "$ctr" >/dev/null 2>&1 || true
    buildah rm "$ctr" >/dev/null 2>&1 || true
  }
  trap cleanup EXIT
  root=$(buildah mount "$ctr")
  mkdir -p "$root/proc" "$ro"
  touch "$root/etc/hosts" "$root/etc/resolv.conf"
  mount --bind "$root" "$ro"
  mount -o remount,bind,ro "$ro"
  mount -t proc proc "$ro/proc"
  mount --bind -o ro /etc/hosts "$ro/etc/hosts"
  mount --bind -o ro /etc/resolv.conf "$ro/etc/resolv.conf"
  # The image's own configuration: its user and entrypoint.
  buildah inspect --type image "$image" |
    python3 -c 'import json, sys; print(json.dumps(json.load(sys.stdin)["OCIv1"]["config"]))' >"$work/config.json"
  export KONGFLOW_IMAGE_ROOT=$ro KONGFLOW_IMAGE_CONFIG=$work/config.json SQLX_OFFLINE=true
  unset DATABASE_URL
  timeout 900 cargo test --locked --test it image:: -- --ignored --nocapture
  ;;
*)
  echo "usage: scripts/image.sh [build|test|bases]" >&2
  exit 2
  ;;
esac
