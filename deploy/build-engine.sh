#!/usr/bin/env bash
# Build the station's TensorRT plans on this Jetson, before the line starts, exactly as the daemon
# would on its first start (same builder, same cache names), so the daemon then loads them in seconds.
#
#   deploy/build-engine.sh [defectsam engine build options]
#       --bundle DIR  --precision fp16|int8|fp32  --plan-dir DIR  --workspace-mib N  --device N
#       --force       rebuild even when a cached plan loads
#       --trtexec     print the equivalent trtexec command lines instead of building
#
# It runs `defectsam engine build` with the daemon's config (/etc/defectsam/defectsam.yaml and the
# overrides in /etc/defectsam/defectsam.env), as the service user when started as root, so the
# plans land where the daemon looks (engine.backend.plan_dir, else beside the bundle) and the
# daemon may replace them. It prints the plan paths. Without TensorRT or pycuda it fails with one
# line and exit status 2.
#
# The trtexec equivalent (JetPack's /usr/src/tensorrt/bin/trtexec, TensorRT 10), for the segment graph
# at fp16; `--trtexec` prints these lines (the find graph's too) with this device's plan file names filled in:
#
#   trtexec --onnx=BUNDLE/segment.onnx --saveEngine=PLAN_DIR/segment.<sha12>.fp16.trt<version>.<gpu>-sm<cc>.max<profile>.plan \
#       --memPoolSize=workspace:1024 --device=0 --skipInference --fp16 \
#       --minShapes=windows:1x3x16x16 --optShapes=windows:24x3x128x128 --maxShapes=windows:24x3x128x128
#
# int8 builds from segment.int8.onnx and find.int8.onnx (the QDQ graphs) with `--fp16 --int8`; fp32 drops
# `--fp16`. The find graph's profile is the camera frame's find input (backend.frame_width/height).
set -euo pipefail

CONFIG=${DEFECTSAM_CONFIG:-/etc/defectsam/defectsam.yaml}
ENV_FILE=${DEFECTSAM_ENV_FILE:-/etc/defectsam/defectsam.env}
SERVICE_USER=${DEFECTSAM_USER:-defectsam}
DEFECTSAM=${DEFECTSAM_BIN:-/opt/defectsam/venv/bin/defectsam}

if [ ! -x "$DEFECTSAM" ]; then
    DEFECTSAM=$(command -v defectsam || true)
fi
if [ -z "$DEFECTSAM" ]; then
    echo "build-engine.sh: error: defectsam not found (install it with deploy/install.sh)" >&2
    exit 2
fi

args=(engine build)
if [ -f "$CONFIG" ]; then
    args+=(--config "$CONFIG")
fi
args+=("$@")

# The daemon's environment: the same DEFECTSAM__* overrides (bundle, precision, ...) it runs with.
if [ -r "$ENV_FILE" ]; then
    set -a
    # shellcheck source=/dev/null
    . "$ENV_FILE"
    set +a
fi

if [ "$(id -u)" = 0 ] && id "$SERVICE_USER" >/dev/null 2>&1; then
    # Keep the environment (the overrides just read) and build as the user that owns the plan cache.
    home=$(getent passwd "$SERVICE_USER" | cut -d: -f6)
    exec runuser -m -u "$SERVICE_USER" -- env HOME="$home" "$DEFECTSAM" "${args[@]}"
fi
exec "$DEFECTSAM" "${args[@]}"
