#!/usr/bin/env bash
# Install (or upgrade) defectsam as a systemd service on a Jetson with JetPack 6, from this checkout.
#
#   sudo deploy/install.sh [--bundle DIR] [--precision fp16|int8|fp32] [--no-build] [--no-start] [--dry-run]
#
#   --bundle DIR   the station's engine bundle: verified, copied to /opt/defectsam/bundles/<name>,
#                  and named in /etc/defectsam/defectsam.env (default: keep the configured one)
#   --precision P  TensorRT precision, set in defectsam.env (default: the config's, fp16)
#   --no-build     do not build the TensorRT plans now (the daemon builds them on its first start)
#   --no-start     install and enable, but do not (re)start the service
#   --dry-run      print the steps, change nothing
#
# What it does (deploy/README.md has the details): apt packages (python3-venv, python3-dev,
# build-essential, JetPack's python3-libnvinfer); a system user 'defectsam' in the video, render and
# plugdev groups; a venv in /opt/defectsam/venv that sees JetPack's TensorRT bindings
# (--system-site-packages) with defectsam[tensorrt,basler] (pycuda compiles against /usr/local/cuda);
# /etc/defectsam/defectsam.yaml from deploy/defectsam.yaml and defectsam.env with a generated API
# token (both kept when present); /var/lib/defectsam/{store,plans}; the systemd unit; the TensorRT
# plans (deploy/build-engine.sh, as the service user); then enable and restart the service.
set -euo pipefail

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PREFIX=/opt/defectsam
VENV=$PREFIX/venv
ETC=/etc/defectsam
ENV_FILE=$ETC/defectsam.env
STATE=/var/lib/defectsam
UNIT=/etc/systemd/system/defectsam.service
SERVICE_USER=defectsam
BUNDLE=""
PRECISION=""
BUILD=1
START=1
DRY_RUN=0

die() {
    echo "install.sh: error: $*" >&2
    exit 2
}

usage() {
    sed -n '2,/^set -euo pipefail/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
}

while [ $# -gt 0 ]; do
    case "$1" in
        --bundle) [ $# -ge 2 ] || die "--bundle needs a directory"; BUNDLE=$2; shift 2 ;;
        --precision) [ $# -ge 2 ] || die "--precision needs fp16, int8 or fp32"; PRECISION=$2; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        --no-start) START=0; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
done
case "$PRECISION" in "" | fp16 | int8 | fp32) ;; *) die "--precision must be fp16, int8 or fp32, not '$PRECISION'" ;; esac
if [ -n "$BUNDLE" ]; then
    [ -f "$BUNDLE/manifest.json" ] || die "--bundle $BUNDLE: no manifest.json (not an engine bundle)"
    BUNDLE=$(cd "$BUNDLE" && pwd)
fi
if [ "$DRY_RUN" = 0 ] && [ "$(id -u)" != 0 ]; then
    die "run as root (sudo deploy/install.sh), or with --dry-run to see the steps"
fi

# Print a step (shell-quoted), then run it (unless --dry-run).
run() {
    printf '+'
    printf ' %q' "$@"
    printf '\n'
    if [ "$DRY_RUN" = 0 ]; then
        "$@"
    fi
}

# Set KEY=VALUE in the env file, replacing an earlier value.
set_env() {
    echo "+ set $1=$2 in $ENV_FILE"
    if [ "$DRY_RUN" = 0 ]; then
        sed -i "/^$1=/d" "$ENV_FILE"
        echo "$1=$2" >>"$ENV_FILE"
    fi
}

echo "== defectsam: installing from $SRC"
if [ -f /etc/nv_tegra_release ]; then
    echo "   $(head -n 1 /etc/nv_tegra_release)"
else
    echo "   warning: /etc/nv_tegra_release not found: not a Jetson; TensorRT must come from elsewhere" >&2
fi

echo "== packages"
packages=(python3-venv python3-dev python3-pip build-essential)
if [ -f /etc/nv_tegra_release ]; then
    packages+=(python3-libnvinfer)  # JetPack's TensorRT Python bindings (PyPI has no Jetson wheels)
fi
run apt-get update -qq
run env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}"

echo "== user $SERVICE_USER"
if ! id "$SERVICE_USER" >/dev/null 2>&1; then
    run useradd --system --user-group --home-dir "$STATE" --no-create-home --shell /usr/sbin/nologin \
        --comment "defectsam inspection daemon" "$SERVICE_USER"
fi
for group in video render plugdev; do  # GPU and V4L2 devices; Basler USB3 cameras (pylon udev rules)
    if getent group "$group" >/dev/null; then
        run usermod --append --groups "$group" "$SERVICE_USER"
    fi
done

echo "== venv $VENV"
run python3 -m venv --system-site-packages "$VENV"
run "$VENV/bin/pip" install --quiet --upgrade pip
# pycuda compiles here: nvcc and cuda.h from /usr/local/cuda, libcuda from CUDA's link stub.
run env CUDA_ROOT=/usr/local/cuda PATH="/usr/local/cuda/bin:$PATH" LIBRARY_PATH=/usr/local/cuda/lib64/stubs \
    "$VENV/bin/pip" install --quiet "${SRC}[tensorrt,basler]"
run install -D -m 0644 "$SRC/deploy/README.md" "$PREFIX/share/README.md"

echo "== files"
run install -d -m 0755 "$ETC"
run install -d -o "$SERVICE_USER" -g "$SERVICE_USER" -m 0750 "$STATE" "$STATE/store" "$STATE/plans"
if [ ! -f "$ETC/defectsam.yaml" ]; then
    run install -m 0644 "$SRC/deploy/defectsam.yaml" "$ETC/defectsam.yaml"
else
    echo "   keeping $ETC/defectsam.yaml (deploy/defectsam.yaml is the current template)"
fi
if [ ! -f "$ENV_FILE" ]; then
    echo "+ write $ENV_FILE (DEFECTSAM__API__TOKEN: a new random token)"
    if [ "$DRY_RUN" = 0 ]; then
        install -m 0640 -o root -g "$SERVICE_USER" /dev/null "$ENV_FILE"
        printf '# defectsam secrets and per-station overrides (DEFECTSAM__SECTION__KEY=value)\n' >>"$ENV_FILE"
        printf 'DEFECTSAM__API__TOKEN=%s\n' "$(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')" \
            >>"$ENV_FILE"
    fi
fi
if [ -n "$BUNDLE" ]; then
    run "$VENV/bin/defectsam" bundle inspect "$BUNDLE"  # verifies the schema and every checksum
    dest="$PREFIX/bundles/$(basename "$BUNDLE")"
    run rm -rf "$dest"
    run install -d -m 0755 "$PREFIX/bundles"
    run cp -r "$BUNDLE" "$dest"
    set_env DEFECTSAM__ENGINE__BUNDLE "$dest"
fi
if [ -n "$PRECISION" ]; then
    set_env DEFECTSAM__ENGINE__BACKEND__PRECISION "$PRECISION"
fi
echo "+ defectsam config check $ETC/defectsam.yaml (with $ENV_FILE)"
if [ "$DRY_RUN" = 0 ]; then
    # shellcheck source=/dev/null
    (set -a && . "$ENV_FILE" && set +a && "$VENV/bin/defectsam" config check --quiet "$ETC/defectsam.yaml")
fi

echo "== systemd unit"
run install -m 0644 "$SRC/deploy/defectsam.service" "$UNIT"
run systemctl daemon-reload

if [ "$BUILD" = 1 ]; then
    echo "== TensorRT plans (minutes on a first build)"
    run env DEFECTSAM_BIN="$VENV/bin/defectsam" "$SRC/deploy/build-engine.sh"
fi

echo "== service"
run systemctl enable defectsam.service
if [ "$START" = 1 ]; then
    run systemctl restart defectsam.service
    echo "   follow it: journalctl -u defectsam -f; readiness: http://127.0.0.1:8080/readyz (live page at /)"
fi
echo "== done"
