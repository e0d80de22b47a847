#!/usr/bin/env bash
# Build docker-compose.yml's images offline (no container registry): splitglm, splitglm-sensors, splitglm-mosquitto.
#   deploy/compose/build-images.sh          (as root: debootstrap and dockerd need it; `make docker` installs them)
#
# 1. splitglm-base:<key>: `debootstrap --variant=minbase` of Debian bookworm with python3, python3-venv,
#    ca-certificates and Mosquitto (its `mosquitto` user given uid 1883, as in the eclipse-mosquitto image), from
#    the Debian mirror ($DEBIAN_MIRROR), then `docker import`. splitglm-mosquitto:latest is this image.
# 2. The wheels: deploy/compose/requirements.py lists each image's, pinned to what $PYTHON's venv runs; `pip
#    download` fetches them into $BUILD/wheels (pip's usual index and find-links) once.
# 3. splitglm-{sensors,splitglm}-deps:<key>: the base with a venv in /opt/splitglm, installed from those wheels
#    by `docker run --network none` (the wheels mounted, so they stay out of the image) and `docker commit`.
#    splitglm-plan:<key> adds the demo plan at /plans/demo, exported on the host (`splitglm demo-plan`: the host's
#    cache) and mounted the same way.
# 4. deploy/compose/Dockerfile on top: the project's wheel.
# Each <key> hashes what its image is made of (recipe, packages, pins): a second run rebuilds only what changed.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
BUILD=${SPLITGLM_COMPOSE_BUILD:-$HERE/.build}
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PACKAGES=python3,python3-venv,ca-certificates,mosquitto,mosquitto-clients
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}

log() { echo "build-images [${SECONDS}s]: $*" >&2; }
key() { sha256sum | cut -c1-16; }
have() { docker image inspect "$1" >/dev/null 2>&1; }

rootfs() {  # DIR: a minimal Debian with what every image needs
    rm -rf "$1"
    debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$1" "$MIRROR" >"$BUILD/debootstrap.log" \
        || { tail -n 20 "$BUILD/debootstrap.log" >&2; return 1; }
    # Mosquitto as uid 1883 (what `splitglm secrets --chown` gives its folder), its plugin where compose names it
    chroot "$1" sh -ec 'old=$(id -u mosquitto)
        usermod -u 1883 mosquitto && groupmod -g 1883 mosquitto
        find / -xdev -uid "$old" -exec chown -h 1883:1883 {} +
        mkdir -p /mosquitto/data && chown 1883:1883 /mosquitto/data
        ln -s /usr/lib/*/mosquitto_dynamic_security.so /usr/lib/mosquitto_dynamic_security.so'
    rm -rf "$1"/var/cache/apt/archives/*.deb "$1"/var/lib/apt/lists/* "$1"/usr/share/doc/* "$1"/usr/share/man/* \
        "$1"/usr/share/locale/* "$1"/usr/share/info/*
}

base_image() {
    local tag
    tag=splitglm-base:$( (echo "$SUITE $PACKAGES"; declare -f rootfs) | key)
    if ! have "$tag"; then
        log "debootstrap $SUITE ($PACKAGES) from $MIRROR"
        rootfs "$BUILD/rootfs"
        tar -C "$BUILD/rootfs" -c . | docker import -c 'CMD ["/bin/bash"]' - "$tag" >/dev/null
        rm -rf "$BUILD/rootfs"
    fi
    echo "$tag"
}

wheels() {  # the requirement files, and every wheel they need, in $BUILD/{req,wheels}
    "$PYTHON" "$HERE/requirements.py" "$BUILD/req"
    local stamp=$BUILD/wheels/.complete
    local want
    want=$(cat "$BUILD"/req/*.txt | key)
    if [[ "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
        log "pip download (the pins of $PYTHON's venv) into $BUILD/wheels"
        "$PYTHON" -m pip download --quiet --disable-pip-version-check --only-binary=:all: -d "$BUILD/wheels" \
            -r "$BUILD/req/splitglm.txt" -r "$BUILD/req/sensors.txt" -c "$BUILD/req/constraints.txt" \
            2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
        echo "$want" >"$stamp"
    fi
}

layer() {  # NAME BASE KEY SCRIPT [docker run -v ...]: BASE + what SCRIPT does, committed as NAME:<hash of all>
    local name=$1 base=$2 what=$3 script=$4 tag
    shift 4
    tag=$name:$( (echo "$base"; echo "$what"; echo "$script") | key)
    if ! have "$tag"; then
        log "$name: $(echo "$script" | head -n 1)"
        docker rm -f splitglm-layer-build >/dev/null 2>&1 || true
        docker run --name splitglm-layer-build --network none "$@" "$base" sh -ec "$script" >&2
        docker commit splitglm-layer-build "$tag" >/dev/null
        docker rm splitglm-layer-build >/dev/null
    fi
    echo "$tag"
}

deps_image() {  # ROLE BASE: BASE + a venv in /opt/splitglm with ROLE's wheels (mounted: they stay out of the image)
    layer "splitglm-$1-deps" "$2" "$(cat "$BUILD/req/$1.txt" "$BUILD/req/constraints.txt")" \
        "python3 -m venv /opt/splitglm
         /opt/splitglm/bin/pip install --quiet --disable-pip-version-check --no-compile --no-index \\
             --find-links /wheels -r /req/$1.txt -c /req/constraints.txt
         /opt/splitglm/bin/python -m compileall -q -j 0 /opt/splitglm/lib >/dev/null || true  # on every core
         rm -rf /root/.cache" \
        -v "$BUILD/wheels:/wheels:ro" -v "$BUILD/req:/req:ro"
}

plan_image() {  # BASE: BASE + the demo plan at /plans/demo, exported on the host (its cache) and readable by all
    local plan
    plan=$("$PYTHON" -m splitglm.cli demo-plan | tail -n 1)
    layer splitglm-plan "$1" "$(cat "$plan/plan.json")" \
        "mkdir /plans && cp -r /plan /plans/demo && chmod -R a+rX,go-w /plans" -v "$plan:/plan:ro"
}

wheel() {  # $BUILD/context/wheel: the project's wheel (built from a copy: no build/ in the checkout)
    rm -rf "$BUILD/context" "$BUILD/src"
    mkdir -p "$BUILD/src"
    tar -C "$ROOT" --exclude=__pycache__ -c pyproject.toml README.md protos runtime partitioner device_agent \
        edge_node cloud_service splitglm | tar -C "$BUILD/src" -x
    "$PYTHON" -m pip wheel --quiet --disable-pip-version-check --no-deps --no-build-isolation \
        -w "$BUILD/context/wheel" "$BUILD/src"
}

main() {
    mkdir -p "$BUILD"
    exec 2> >(tee "$BUILD/build-images.log" >&2)  # kept for a look at where the time went
    "$HERE/dockerd.sh"
    local base sensors full fetching
    wheels >"$BUILD/wheels.log" 2>&1 &  # mostly network: beside debootstrap
    fetching=$!
    base=$(base_image)
    docker tag "$base" splitglm-mosquitto:latest
    if ! wait "$fetching"; then
        cat "$BUILD/wheels.log" >&2
        return 1
    fi
    grep "^build-images" "$BUILD/wheels.log" >&2 || true
    sensors=$(deps_image sensors "$base")
    full=$(plan_image "$(deps_image splitglm "$base")")
    wheel
    for target in sensors splitglm; do
        local image=splitglm-$target
        [[ $target == splitglm ]] && image=splitglm
        log "docker build --target $target -t $image:latest"
        DOCKER_BUILDKIT=0 docker build --quiet -f "$HERE/Dockerfile" --target "$target" -t "$image:latest" \
            --build-arg SENSORS_FROM="$sensors" --build-arg SPLITGLM_FROM="$full" "$BUILD/context" >/dev/null
    done
    log "done"
    docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E '^splitglm(-sensors|-mosquitto)?:latest' >&2
}

main "$@"
