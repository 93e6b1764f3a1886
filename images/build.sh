#!/usr/bin/env bash
# Builds OCI image archives of the Serval binaries without a container engine.
#
#   images/build.sh [--bin-dir DIR] [--out-dir DIR] [--tag TAG] [NAME...]
#
# NAME is any of serval-operator, serval-sidecar, serval-router, digits-transformer (default:
# all four), or any other binary in DIR (the e2e node's `pause`), taken from DIR (default:
# $CARGO_TARGET_DIR/release, i.e. ~/.cache/serval/target/release).
# Each image is one layer: the binary at /usr/local/bin/NAME, the shared libraries `ldd`
# lists, the dynamic loader, the host's CA bundle (for https model URIs) and a passwd entry
# for user 65532, which the image runs as.
#
# The result, OUT/NAME-TAG.tar (default OUT: ~/.cache/serval/images), is an OCI image layout
# (oci-layout, index.json, blobs/sha256/...) that also carries a docker-archive manifest.json,
# so one file loads with any of:
#   skopeo copy oci-archive:OUT/serval-operator-0.1.0.tar docker://registry.example/serval-operator:0.1.0
#   ctr -n k8s.io images import OUT/serval-operator-0.1.0.tar
#   docker load -i OUT/serval-operator-0.1.0.tar
#
# Byte-for-byte reproducible for the same binaries and libraries: sorted tar entries, fixed
# mtimes and owners, gzip without a timestamp, created = SOURCE_DATE_EPOCH (default 0).
# Needs only bash, coreutils, tar, gzip, ldd (and strip, optional).
#
# Environment: SERVAL_IMAGE_STRIP=0 keeps debug info in the binary (default: stripped of
# debug sections, symbols kept so panics still name functions).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SERVAL_CACHE="${SERVAL_CACHE:-$HOME/.cache/serval}"
BIN_DIR="${CARGO_TARGET_DIR:-$SERVAL_CACHE/target}/release"
OUT_DIR="$SERVAL_CACHE/images"
TAG=""
NAMES=()
# digits-transformer: the user-container example (examples/user-container).
ALL=(serval-operator serval-sidecar serval-router digits-transformer)
STRIP="${SERVAL_IMAGE_STRIP:-1}"
EPOCH="${SOURCE_DATE_EPOCH:-0}"
USER_ID=65532

die() { echo "images/build.sh: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    --bin-dir) BIN_DIR="$2"; shift 2 ;;
    --out-dir) OUT_DIR="$2"; shift 2 ;;
    --tag) TAG="$2"; shift 2 ;;
    -h|--help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) die "unknown option $1" ;;
    *) NAMES+=("$1"); shift ;;
  esac
done
[ ${#NAMES[@]} -gt 0 ] || NAMES=("${ALL[@]}")
if [ -z "$TAG" ]; then
  # The workspace version, which the chart's appVersion and the operator's default image
  # tags also use.
  TAG="$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' "$REPO/Cargo.toml" | head -n1)"
  [ -n "$TAG" ] || die "cannot read the workspace version from $REPO/Cargo.toml"
fi
for tool in tar gzip sha256sum ldd; do
  command -v "$tool" >/dev/null || die "$tool is required"
done
case "$(uname -m)" in
  x86_64) ARCH=amd64 ;;
  aarch64) ARCH=arm64 ;;
  *) die "unsupported architecture $(uname -m)" ;;
esac
CREATED="$(date -u -d "@$EPOCH" +%Y-%m-%dT%H:%M:%SZ)"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/serval-images.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

# Deterministic tar of the entries of directory $1 into file $2.
det_tar() {
  local dir="$1" out="$2"
  (cd "$dir" && find . -mindepth 1 -maxdepth 1 -printf '%P\n' | LC_ALL=C sort |
    tar --sort=name --mtime="@$EPOCH" --owner=0 --group=0 --numeric-owner \
        --format=gnu -cf "$out" -T -)
}

sha() { sha256sum "$1" | cut -d' ' -f1; }
size() { stat -c %s "$1"; }

# Moves file $1 into the blob store of layout $2; prints its digest hex.
add_blob() {
  local hex
  hex="$(sha "$1")"
  mv "$1" "$2/blobs/sha256/$hex"
  echo "$hex"
}

# The files the binary needs at run time: its shared libraries and the loader, as `ldd`
# resolves them on this machine.
runtime_libs() {
  local bin="$1" out
  out="$(ldd "$bin" 2>&1)" || {
    # A static binary needs nothing.
    if grep -q "not a dynamic executable\|statically linked" <<<"$out"; then return 0; fi
    die "ldd $bin failed: $out"
  }
  if grep -q "not found" <<<"$out"; then
    die "$bin needs libraries this machine lacks:"$'\n'"$out"
  fi
  grep -q "statically linked" <<<"$out" && return 0
  # "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" and "/lib64/ld-linux-x86-64.so.2 (0x...)"
  awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' <<<"$out" | LC_ALL=C sort -u
}

build_one() {
  local name="$1"
  local bin="$BIN_DIR/$name"
  [ -x "$bin" ] || die "$bin is missing: build it first (cargo build --release -p ${name})"
  local root="$WORK/$name/rootfs" layout="$WORK/$name/layout"
  mkdir -p "$root/usr/local/bin" "$root/etc" "$root/tmp" "$layout/blobs/sha256"
  chmod 1777 "$root/tmp"

  cp "$bin" "$root/usr/local/bin/$name"
  if [ "$STRIP" != 0 ] && command -v strip >/dev/null; then
    strip --strip-debug "$root/usr/local/bin/$name"
  fi
  chmod 0755 "$root/usr/local/bin/$name"
  local libs lib
  libs="$(runtime_libs "$bin")"
  while IFS= read -r lib; do
    [ -n "$lib" ] || continue
    mkdir -p "$root$(dirname "$lib")"
    # Dereference: the layer holds the library under the path the loader asks for.
    cp -L "$lib" "$root$lib"
    chmod 0755 "$root$lib"
  done <<<"$libs"
  if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
    mkdir -p "$root/etc/ssl/certs"
    cp -L /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
    chmod 0644 "$root/etc/ssl/certs/ca-certificates.crt"
  fi
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:%d:%d:nonroot:/tmp:/sbin/nologin\n' \
    "$USER_ID" "$USER_ID" >"$root/etc/passwd"
  printf 'root:x:0:\nnonroot:x:%d:\n' "$USER_ID" >"$root/etc/group"
  chmod 0644 "$root/etc/passwd" "$root/etc/group"

  # Layer: tar, its digest is the diff_id; gzip, its digest is the blob's.
  det_tar "$root" "$WORK/$name/layer.tar"
  local diff_id
  diff_id="$(sha "$WORK/$name/layer.tar")"
  gzip -n -6 "$WORK/$name/layer.tar"
  local layer_size layer
  layer_size="$(size "$WORK/$name/layer.tar.gz")"
  layer="$(add_blob "$WORK/$name/layer.tar.gz" "$layout")"

  printf '{"architecture":"%s","os":"linux","created":"%s","config":{"User":"%d:%d","Entrypoint":["/usr/local/bin/%s"],"Env":["PATH=/usr/local/bin:/usr/bin:/bin"],"WorkingDir":"/","Labels":{"org.opencontainers.image.title":"%s","org.opencontainers.image.version":"%s"}},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]},"history":[{"created":"%s","created_by":"images/build.sh: %s, its shared libraries and the loader"}]}' \
    "$ARCH" "$CREATED" "$USER_ID" "$USER_ID" "$name" "$name" "$TAG" "$diff_id" "$CREATED" "$name" \
    >"$WORK/$name/config.json"
  local config_size config
  config_size="$(size "$WORK/$name/config.json")"
  config="$(add_blob "$WORK/$name/config.json" "$layout")"

  printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%d},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:%s","size":%d}],"annotations":{"org.opencontainers.image.title":"%s","org.opencontainers.image.version":"%s","org.opencontainers.image.created":"%s"}}' \
    "$config" "$config_size" "$layer" "$layer_size" "$name" "$TAG" "$CREATED" >"$WORK/$name/manifest.json"
  local manifest_size manifest
  manifest_size="$(size "$WORK/$name/manifest.json")"
  manifest="$(add_blob "$WORK/$name/manifest.json" "$layout")"

  # ref.name is what `skopeo ... oci-archive:FILE:TAG` selects; io.containerd.image.name is
  # the name `ctr import` gives the image.
  printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%d,"platform":{"architecture":"%s","os":"linux"},"annotations":{"org.opencontainers.image.ref.name":"%s","io.containerd.image.name":"docker.io/library/%s:%s"}}]}\n' \
    "$manifest" "$manifest_size" "$ARCH" "$TAG" "$name" "$TAG" >"$layout/index.json"
  printf '{"imageLayoutVersion":"1.0.0"}\n' >"$layout/oci-layout"
  # docker-archive: `docker load` reads this and the same blobs.
  printf '[{"Config":"blobs/sha256/%s","RepoTags":["%s:%s"],"Layers":["blobs/sha256/%s"]}]\n' \
    "$config" "$name" "$TAG" "$layer" >"$layout/manifest.json"

  mkdir -p "$OUT_DIR"
  local out="$OUT_DIR/$name-$TAG.tar"
  det_tar "$layout" "$out.partial"
  mv "$out.partial" "$out"
  echo "$out"
}

for name in "${NAMES[@]}"; do
  case " ${ALL[*]} " in
    *" $name "*) ;;
    *) [ -x "$BIN_DIR/$name" ] || die "unknown image $name (one of: ${ALL[*]}, or a binary in $BIN_DIR)" ;;
  esac
  build_one "$name"
done
