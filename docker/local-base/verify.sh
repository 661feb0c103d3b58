#!/usr/bin/env bash
# Start fedcal's compose stack under podman on a host that cannot pull from Docker Hub, and run
# the offline smoke federation through it (what the 2026-11-24 session did to verify docker/).
#
#   sudo bash docker/local-base/verify.sh /path/to/pacs-mini [tls]
#
# Needs root, podman + runc + podman-compose + the CNI dnsname plugin + debootstrap (Debian:
# apt-get install podman runc podman-compose golang-github-containernetworking-plugin-dnsname
# debootstrap), network access to a Debian mirror and PyPI, ~10 GB of disk, and fedcal installed
# on the host (for `fedcal certs` and the `flwr` CLI). Grafana is not started: its image cannot be
# built from Debian packages. Steps: debootstrap a Debian root file system -> import it as an image
# -> build stand-ins for flwr/superlink, flwr/supernode, flwr/superexec and prom/prometheus
# (docker/local-base/Dockerfile) -> build fedcal-app (docker/Dockerfile) -> compose up -> flwr run.
set -euo pipefail
DATA=$(realpath "${1:?usage: verify.sh /path/to/pacs-mini [tls]}")
MODE=${2:-insecure}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WORK=${WORK:-/var/tmp/fedcal-podman}
CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt   # passed into builds so pip trusts this host's TLS setup
mkdir -p "$WORK" /etc/containers
[ -f /etc/containers/containers.conf ] || printf '[containers]\ndefault_ulimits = []\n\n[engine]\nruntime = "runc"\n' > /etc/containers/containers.conf

if ! podman image exists localhost/fc-debian:bookworm; then
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates bookworm "$WORK/rootfs" http://deb.debian.org/debian
    tar -C "$WORK/rootfs" -c . | podman import - localhost/fc-debian:bookworm
fi
build() { podman build -v "$CA_BUNDLE:$CA_BUNDLE:ro" --build-arg DEBIAN_IMAGE=localhost/fc-debian:bookworm "$@"; }
for target in superlink supernode superexec; do
    build -f "$ROOT/docker/local-base/Dockerfile" --target "$target" -t "docker.io/flwr/$target:1.42.0" "$ROOT/docker/local-base"
done
build -f "$ROOT/docker/local-base/Dockerfile" --target prometheus -t docker.io/prom/prometheus:v2.55.1 "$ROOT/docker/local-base"
build -f "$ROOT/docker/local-base/Dockerfile" --target nginx -t docker.io/library/nginx:1.27-alpine "$ROOT/docker/local-base"
podman build -v "$CA_BUNDLE:$CA_BUNDLE:ro" -f "$ROOT/docker/Dockerfile" -t fedcal-app:0.1.0 "$ROOT"

export FEDCAL_DATA="$DATA" FEDCAL_WEIGHTS="$WORK/hf-cache" FLWR_HOME="$WORK/flwr"
mkdir -p "$FEDCAL_WEIGHTS"
COMPOSE="$ROOT/docker/compose.yml"; CONN=compose
SERVICES="superlink serverapp supernode-0 supernode-1 supernode-2 supernode-3 clientapp-0 clientapp-1 clientapp-2 clientapp-3 prometheus"
if [ "$MODE" = tls ]; then
    COMPOSE="$ROOT/docker/compose.tls.yml"; CONN=compose-tls; SERVICES="$SERVICES proxy register"
    rm -rf "$ROOT/docker/certs"
    fedcal certs --out "$ROOT/docker/certs" --san superlink --san proxy --supernodes 4 --operators 1
    chown -R 49999:49999 "$ROOT/docker/certs"
fi
python3 - "$FLWR_HOME" "$CONN" <<'PY'
import sys
from pathlib import Path
from deploy.cluster import add_connection
home, conn = Path(sys.argv[1]), sys.argv[2]
# TLS: the Control API only through the operator tunnel (loopback), which holds the operator certificate
add_connection(home, conn, "127.0.0.1:8001" if conn.endswith("tls") else "127.0.0.1:8000", make_default=True)
PY
podman-compose -p fedcal -f "$COMPOSE" up -d $SERVICES
trap 'podman-compose -p fedcal -f "$COMPOSE" down' EXIT
if [ "$MODE" = tls ]; then
    C="$ROOT/docker/certs"
    fedcal operator-tunnel --proxy 127.0.0.1:8000 --cert "$C/operator-0.pem" --key "$C/operator-0.key" --ca "$C/ca.crt" &
    trap 'kill %1; podman-compose -p fedcal -f "$COMPOSE" down' EXIT
fi
for _ in $(seq 90); do
    [ "$(flwr supernode list "$CONN" --format json 2>/dev/null | grep -c '"online"')" = 4 ] && break
    sleep 2
done
CFG="$WORK/run.toml"
sed -e 's/^port = 0$/port = 9464\nlinger = 15.0/' "$ROOT/configs/offline-smoke.toml" > "$CFG"
(cd "$ROOT" && flwr run . "$CONN" --stream --run-config "$CFG")
podman exec fedcal_serverapp_1 sh -c 'ls -d /app/fedcal-runs/*/summary.json'
curl -s "http://127.0.0.1:9090/api/v1/query_range?query=fedcal_round&start=$(($(date +%s)-900))&end=$(date +%s)&step=15" | head -c 300; echo
