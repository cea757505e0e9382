#!/usr/bin/env bash
# Builds the agent and hub images from Dockerfile.arm64, for arm64 (and amd64), with podman or
# docker buildx, on a machine that may have no registry: the base image comes from the registry
# where it can be pulled and is made locally (mmdebstrap bookworm + import) where it cannot.
# Also runs a built image the way a pod does (read-only root, uid 10001) and measures sizes.
#
#   scripts/build-image.sh [build] [--arch A]... [--image I]... [--base IMAGE | --local-base]
#                                  [--sizes] [--save DIR]
#   scripts/build-image.sh run [--arch A] [--image I] [-v HOST:CONTAINER]... [-e VAR=VALUE]...
#                              [--entrypoint PROGRAM] -- ARGS...
#   scripts/build-image.sh lock
#
# build  --arch arm64|amd64 (default arm64), --image agent|agent-tracking|hub|full (default
#        agent and hub; agent-tracking = the agent with object tracking, for cameras that
#        publish track events (norfair, scipy: k3s/overlays/tracking); full = agent, tracking and hub in
#        one image, the size baseline). Tags localhost/edge-IMAGE:VERSION-ARCH. --sizes prints each image's unpacked and compressed
#        (gzip layers, as a registry stores them) size and its biggest Python packages.
#        --save DIR writes DIR/edge-IMAGE-VERSION-ARCH.tar, named edge-IMAGE:VERSION as the K3s
#        manifests reference it, for `k3s ctr images import`.
# run    the image's entry point with ARGS as uid 10001, read-only root filesystem, no network,
#        a tmpfs on /tmp; -v mounts read-only. Under QEMU user emulation it adds the ARM CPU
#        view that ONNX Runtime needs (Dockerfile.arm64.smoke explains why).
# lock   rewrites Dockerfile.arm64.constraints' sha256 hashes for the pinned versions (wheels
#        for CPython 3.11 on manylinux aarch64 and x86_64).
#
# What is reused between runs lives under .cache/image (git-ignored): the base root
# filesystem (mmdebstrap takes minutes under emulation), the wheels (downloaded on the host,
# checked against the hashes, so the emulated build needs no network), and podman's layer cache.
# Emulated builds need root once per boot to register QEMU with binfmt_misc.
set -euo pipefail
shopt -s inherit_errexit  # a failure inside $(...) stops the script too
cd "$(dirname "$0")/.."
ROOT=$PWD
CACHE=${EDGE_IMAGE_CACHE:-$ROOT/.cache/image}
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -n1)
CONSTRAINTS=Dockerfile.arm64.constraints
REGISTRY_BASE=python:3.11.11-slim-bookworm
# the local base: what the Dockerfile needs of a Python image (python3 with venv, useradd, and
# the C++ runtime every manylinux wheel may link) on Debian's essential packages; without apt (nothing installs later), CA certificates (the
# programs trust only the CA files their configs name), documentation, locales and iconv's
# codecs (Python has its own), and with merged /usr set up directly (bookworm's usrmerge
# package would bring perl). Every maintainer script runs under emulation: fewer is faster.
DEBIAN_SUITE=bookworm
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
MMDEBSTRAP_ARGS=(--variant=essential --include=python3,python3-venv,passwd,libstdc++6
  --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*'
  --dpkgopt='path-include=/usr/share/doc/*/copyright' --dpkgopt='path-exclude=/usr/share/locale/*'
  --dpkgopt='path-exclude=/usr/share/info/*' --dpkgopt='path-exclude=/usr/lib/*/gconv/*')

log() { echo "build-image: $*" >&2; }
die() { log "error: $*"; exit 1; }
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit "${1:-0}"; }

qemu_arch() { case $1 in arm64) echo aarch64 ;; amd64) echo x86_64 ;; *) die "unknown arch $1 (arm64, amd64)" ;; esac; }
native_arch() { case $(uname -m) in aarch64) echo arm64 ;; x86_64) echo amd64 ;; *) uname -m ;; esac; }
extras_of() {
  case $1 in
    agent) echo agent ;; agent-tracking) echo agent,tracking ;; hub) echo hub ;; full) echo agent,hub,tracking ;;
    *) die "unknown image $1 (agent, agent-tracking, hub, full)" ;;
  esac
}
tag_of() { echo "localhost/edge-$1:$VERSION-$2"; }

engine() {
  if command -v podman >/dev/null 2>&1; then echo podman
  elif command -v docker >/dev/null 2>&1 && docker buildx version >/dev/null 2>&1 \
       && docker info >/dev/null 2>&1; then echo docker
  else die "neither podman nor docker buildx with a running daemon (Debian: apt-get install podman)"
  fi
}

# podman needs, on a machine without systemd and with hybrid cgroups (this one, many CI
# runners), the cgroupfs manager and runc (crun refuses hybrid cgroups); and limits no higher
# than the caller's hard limits, which root may not raise without CAP_SYS_RESOURCE
podman_global() {
  local args=()
  [ -d /run/systemd/system ] || args+=(--cgroup-manager=cgroupfs)
  if [ -e /sys/fs/cgroup/unified ] && command -v runc >/dev/null 2>&1; then args+=(--runtime=runc); fi
  echo "${args[@]}"
}
limits() {
  local n f
  n=$(ulimit -Hu); f=$(ulimit -Hn)
  [ "$n" = unlimited ] || [ "$n" -gt 4096 ] && n=4096
  [ "$f" = unlimited ] || [ "$f" -gt 4096 ] && f=4096
  echo "--ulimit nproc=$n:$n --ulimit nofile=$f:$f"
}

# QEMU user emulation through binfmt_misc, with the fix-binary flag so that the emulator works
# inside chroots and containers; Debian's qemu-user-static ships the registration lines
ensure_emulation() {
  local arch=$1 q
  [ "$arch" = "$(native_arch)" ] && return 0
  q=$(qemu_arch "$arch")
  [ -e "/proc/sys/fs/binfmt_misc/qemu-$q" ] && return 0
  [ -f "/usr/lib/binfmt.d/qemu-$q.conf" ] || die "no QEMU for $arch: apt-get install qemu-user-static"
  [ "$(id -u)" -eq 0 ] || die "registering QEMU for $arch needs root once per boot (or systemd-binfmt)"
  mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
  [ -e "/proc/sys/fs/binfmt_misc/qemu-$q" ] || cat "/usr/lib/binfmt.d/qemu-$q.conf" > /proc/sys/fs/binfmt_misc/register
  log "registered QEMU user emulation for $arch with binfmt_misc"
}

# --- base image ---------------------------------------------------------------------------
local_base() {
  local arch=$1 key tar name start
  key=$(printf '%s\n' "$DEBIAN_SUITE" "${MMDEBSTRAP_ARGS[@]}" | sha256sum | cut -c1-12)
  name=localhost/edge-base:$DEBIAN_SUITE-$arch-$key
  if ! $ENGINE image exists "$name" 2>/dev/null && ! $ENGINE image inspect "$name" >/dev/null 2>&1; then
    tar=$CACHE/base-$DEBIAN_SUITE-$arch-$key.tar
    if [ ! -s "$tar" ]; then
      command -v mmdebstrap >/dev/null 2>&1 || die "no mmdebstrap for the local base: apt-get install mmdebstrap arch-test"
      log "making a Debian $DEBIAN_SUITE $arch base with mmdebstrap (minutes under emulation)"
      start=$(date +%s)
      mkdir -p "$CACHE"
      rm -rf "$tar.part"
      mmdebstrap --quiet --format=tar --arch="$arch" "${MMDEBSTRAP_ARGS[@]}" "$DEBIAN_SUITE" \
        "$tar.part" "$DEBIAN_MIRROR" >&2
      mv "$tar.part" "$tar"
      log "made the base in $(( $(date +%s) - start )) s: $tar"
    fi
    if [ "$ENGINE" = podman ]; then podman import -q --arch "$arch" "$tar" "$name" >/dev/null
    else docker import --platform "linux/$arch" "$tar" "$name" >/dev/null; fi
  fi
  echo "$name"
}

base_for() {
  local arch=$1
  if [ -n "$BASE" ]; then echo "$BASE"; return; fi
  if [ "$LOCAL_BASE" = 0 ]; then
    if [ "$ENGINE" = podman ] && timeout 120 podman pull -q --arch "$arch" "docker.io/library/$REGISTRY_BASE" >/dev/null 2>&1; then
      echo "docker.io/library/$REGISTRY_BASE"; return
    elif [ "$ENGINE" = docker ] && timeout 120 docker pull -q --platform "linux/$arch" "$REGISTRY_BASE" >/dev/null 2>&1; then
      echo "$REGISTRY_BASE"; return
    fi
    log "cannot pull $REGISTRY_BASE for $arch: using a local Debian base"
  fi
  local_base "$arch"
}

# --- wheels ---------------------------------------------------------------------------------
pip_cmd() {
  if [ -x "$ROOT/.venv/bin/python" ]; then echo "$ROOT/.venv/bin/python -m pip"; else echo "python3 -m pip"; fi
}
platform_args() {
  local q=$1
  echo "--only-binary=:all: --platform manylinux_2_28_$q --platform manylinux_2_17_$q
    --platform manylinux2014_$q --python-version 3.11 --implementation cp --abi cp311 --abi abi3 --abi none"
}
wheels_for() {
  local arch=$1 q dir stamp
  q=$(qemu_arch "$arch")
  dir=$CACHE/wheels/$arch
  stamp=$dir/.constraints-$(sha256sum "$CONSTRAINTS" | cut -c1-16)
  if [ ! -f "$stamp" ]; then
    log "downloading the $arch wheels pinned in $CONSTRAINTS (hash-checked)"
    rm -rf "$dir" && mkdir -p "$dir"
    # shellcheck disable=SC2046
    PIP_CONSTRAINT="" PIP_FIND_LINKS="" $(pip_cmd) download -q --no-deps --require-hashes \
      $(platform_args "$q") -d "$dir" -r "$CONSTRAINTS" 2>&1 | grep -v '^WARNING: Location' >&2 || true
    [ "$(find "$dir" -name '*.whl' | wc -l)" -eq "$(grep -c '^[A-Za-z0-9]' "$CONSTRAINTS")" ] \
      || die "not every pinned wheel downloaded for $arch"
    touch "$stamp"
  fi
  echo "$dir"
}

# --- build ----------------------------------------------------------------------------------
context_for() {
  local arch=$1 ctx=$CACHE/context/$1
  rm -rf "$ctx" && mkdir -p "$ctx"
  cp pyproject.toml README.md "$CONSTRAINTS" Dockerfile.arm64.smoke "$ctx/"
  tar --exclude=__pycache__ --exclude='*.pyc' -cf - edge_agent hub | tar -C "$ctx" -xf -
  cp -al "$(wheels_for "$arch")" "$ctx/.wheels" 2>/dev/null || cp -a "$(wheels_for "$arch")" "$ctx/.wheels"
  echo "$ctx"
}

build_one() {
  local arch=$1 image=$2 base=$3 ctx=$4 tag start
  tag=$(tag_of "$image" "$arch")
  start=$(date +%s)
  log "building $tag (EXTRAS=$(extras_of "$image"), base $base)"
  if [ "$ENGINE" = podman ]; then
    podman build --isolation chroot --format docker --arch "$arch" --layers -f "$ROOT/Dockerfile.arm64" \
      --build-arg "BASE_IMAGE=$base" --build-arg "EXTRAS=$(extras_of "$image")" -t "$tag" "$ctx" >&2
  else
    docker buildx build --platform "linux/$arch" --load -f "$ROOT/Dockerfile.arm64" \
      --build-arg "BASE_IMAGE=$base" --build-arg "EXTRAS=$(extras_of "$image")" -t "$tag" "$ctx" >&2
  fi
  log "built $tag in $(( $(date +%s) - start )) s"
}

sizes() {
  local tag=$1 unpacked compressed tmp mnt
  tmp=$(mktemp -d)
  if [ "$ENGINE" = podman ]; then
    unpacked=$(podman image inspect -f '{{.Size}}' "$tag")
    podman save -q --format docker-dir --compress -o "$tmp/oci" "$tag"
    compressed=$(find "$tmp/oci" -type f -printf '%s\n' | awk '{s+=$1} END {print s}')
  else
    unpacked=$(docker image inspect -f '{{.Size}}' "$tag")
    compressed=$(docker save "$tag" | gzip -6 | wc -c)
  fi
  rm -rf "$tmp"
  printf 'size %s unpacked_mb=%.1f compressed_mb=%.1f\n' "$tag" \
    "$(awk "BEGIN {print $unpacked / 1e6}")" "$(awk "BEGIN {print $compressed / 1e6}")"
  if [ "$ENGINE" = podman ] && mnt=$(podman image mount "$tag" 2>/dev/null); then
    echo "  biggest in /opt/venv:"
    du -sm "$mnt"/opt/venv/lib/python3*/site-packages/* 2>/dev/null | sort -rn | head -n 8 \
      | sed "s|$mnt/opt/venv/lib/python3[^/]*/site-packages/||; s|^|    |; s|\t| MB |"
    podman image unmount "$tag" >/dev/null
  fi
}

save_one() {
  local tag=$1 image=$2 arch=$3 dir=$4 name
  name=docker.io/library/edge-$image:$VERSION
  mkdir -p "$dir"
  $ENGINE tag "$tag" "$name"
  $ENGINE save -o "$dir/edge-$image-$VERSION-$arch.tar" "$name" >/dev/null
  $ENGINE rmi "$name" >/dev/null 2>&1 || true
  log "saved $dir/edge-$image-$VERSION-$arch.tar (import: sudo k3s ctr images import FILE)"
}

cmd_build() {
  local arches=() images=() SIZES=0 SAVE="" arch image base ctx
  BASE="" LOCAL_BASE=0
  while [ $# -gt 0 ]; do
    case $1 in
      --arch) arches+=("$2"); shift 2 ;;
      --image) images+=("$2"); shift 2 ;;
      --base) BASE=$2; shift 2 ;;
      --local-base) LOCAL_BASE=1; shift ;;
      --sizes) SIZES=1; shift ;;
      --save) SAVE=$2; shift 2 ;;
      -h|--help) usage ;;
      *) log "unknown option $1"; usage 2 ;;
    esac
  done
  [ ${#arches[@]} -gt 0 ] || arches=(arm64)
  [ ${#images[@]} -gt 0 ] || images=(agent hub)
  for image in "${images[@]}"; do extras_of "$image" >/dev/null; done
  for arch in "${arches[@]}"; do
    ensure_emulation "$arch"
    base=$(base_for "$arch")
    ctx=$(context_for "$arch")
    for image in "${images[@]}"; do
      build_one "$arch" "$image" "$base" "$ctx"
      [ "$SIZES" = 0 ] || sizes "$(tag_of "$image" "$arch")"
      [ -z "$SAVE" ] || save_one "$(tag_of "$image" "$arch")" "$image" "$arch" "$SAVE"
    done
  done
}

# --- run ------------------------------------------------------------------------------------
cpu_view() {
  # the same ARM CPU description as Dockerfile.arm64.smoke's, read by QEMU through
  # QEMU_LD_PREFIX instead of the x86 host's /proc/cpuinfo, with QEMU_CPU=cortex-a72 so that
  # the instructions QEMU offers match it (its default CPU has SVE, which ONNX Runtime would
  # use and QEMU runs about ten times slower: 47 s instead of 5 s for efficientnet-lite0)
  local dir=$1 cpus n
  cpus=$(nproc)
  mkdir -p "$dir/proc" "$dir/sys/devices/system/cpu"
  : > "$dir/proc/cpuinfo"
  for ((n = 0; n < cpus; n++)); do
    printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 3\n\n' "$n" >> "$dir/proc/cpuinfo"
  done
  if [ "$cpus" -gt 1 ]; then echo "0-$((cpus - 1))"; else echo 0; fi > "$dir/sys/devices/system/cpu/possible"
  cp "$dir/sys/devices/system/cpu/possible" "$dir/sys/devices/system/cpu/present"
  chmod -R a+rX "$dir"  # read by the container's uid, not root
}

cmd_run() {
  local arch=arm64 image=agent vols=() view="" rc
  while [ $# -gt 0 ]; do
    case $1 in
      --arch) arch=$2; shift 2 ;;
      --image) image=$2; shift 2 ;;
      -v) vols+=(-v "$2:ro"); shift 2 ;;
      -e) vols+=(-e "$2"); shift 2 ;;
      --entrypoint) vols+=(--entrypoint "$2"); shift 2 ;;
      --) shift; break ;;
      -h|--help) usage ;;
      *) log "unknown option $1"; usage 2 ;;
    esac
  done
  [ "$ENGINE" = podman ] || die "run uses podman"
  ensure_emulation "$arch"
  if [ "$arch" = arm64 ] && [ "$(native_arch)" != arm64 ]; then
    view=$(mktemp -d)
    cpu_view "$view"
    vols+=(-v "$view:/run/qemu-cpu-view:ro" -e QEMU_LD_PREFIX=/run/qemu-cpu-view -e QEMU_CPU=cortex-a72)
  fi
  # shellcheck disable=SC2046
  podman $(podman_global) run --rm --arch "$arch" --read-only --user 10001:10001 --network none \
    --tmpfs /tmp:rw,size=256m,mode=1777 --cap-drop ALL --security-opt no-new-privileges \
    --no-healthcheck \
    $(limits) "${vols[@]}" "$(tag_of "$image" "$arch")" "$@" && rc=0 || rc=$?
  [ -z "$view" ] || rm -rf "$view"
  return "$rc"
}

# --- lock -----------------------------------------------------------------------------------
cmd_lock() {
  local tmp q
  tmp=$(mktemp -d)
  grep -E '^[A-Za-z0-9]' "$CONSTRAINTS" | cut -d' ' -f1 > "$tmp/pins.txt"
  for q in aarch64 x86_64; do
    log "downloading the pinned wheels for $q"
    # shellcheck disable=SC2046
    PIP_CONSTRAINT="" PIP_FIND_LINKS="" $(pip_cmd) download -q --no-deps $(platform_args "$q") \
      -d "$tmp/$q" -r "$tmp/pins.txt" 2>&1 | grep -v '^WARNING: Location' >&2 || true
  done
  python3 - "$CONSTRAINTS" "$tmp" <<'EOF'
import hashlib, pathlib, re, sys
path, tmp = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
norm = lambda s: re.sub(r"[-_.]+", "_", s).lower()
files = sorted(p for p in tmp.glob("*/*.whl"))
head = [l for l in path.read_text().splitlines() if l.startswith("#") or not l.strip()]
out = []
for pin in (tmp / "pins.txt").read_text().split():
    name, version = pin.split("==")
    mine = [f for f in files if norm(f.name.split("-")[0]) == norm(name) and f.name.split("-")[1] == version]
    if len({f.parent.name for f in mine}) != 2:
        sys.exit(f"lock: {pin}: no wheel for both architectures")
    hashes = sorted({hashlib.sha256(f.read_bytes()).hexdigest() for f in mine})
    out.append(pin + "".join(f" --hash=sha256:{h}" for h in hashes))
path.write_text("\n".join(head + out) + "\n")
print(f"lock: {len(out)} pins, hashes for aarch64 and x86_64", file=sys.stderr)
EOF
  rm -rf "$tmp"
}

ENGINE=""
cmd=build
case ${1:-} in build|run|lock) cmd=$1; shift ;; -h|--help) usage ;; esac
case $cmd in
  build) ENGINE=$(engine); cmd_build "$@" ;;
  run) ENGINE=$(engine); cmd_run "$@" ;;
  lock) cmd_lock ;;
esac
