#!/usr/bin/env bash
# Starts a 3-member etcd cluster on loopback for tests (issue 23), data under DIR (default: a
# fresh directory in /dev/shm), and prints one line per member: `NAME PID CLIENT_URL`. Ports
# are BASE..BASE+5 (default 23790): client URLs BASE, BASE+2, BASE+4; peer URLs one above each.
# Stop with: kill $(awk '{print $2}' DIR/members). Each member logs to DIR/NAME.log.
# With ETCD_TLS_DIR set (holding ca.pem, server.pem, server-key.pem, client.pem and
# client-key.pem), client URLs are https:// and clients must present a certificate the CA
# signed (--client-cert-auth); peers stay on plain http on loopback.
# Usage: start-cluster.sh [DIR] [BASE]
set -euo pipefail
command -v etcd >/dev/null || { echo "SKIPPED: etcd not installed (.ci/run installs it)" >&2; exit 3; }
dir=${1:-$(mktemp -d /dev/shm/didgate-etcd.XXXXXX)}
base=${2:-23790}
mkdir -p "$dir"
cluster=""
for i in 0 1 2; do
  cluster+="m$i=http://127.0.0.1:$((base + 2 * i + 1)),"
done
cluster=${cluster%,}
: > "$dir/members"
scheme=http
tls=()
ctl_tls=()
if [ -n "${ETCD_TLS_DIR:-}" ]; then
  scheme=https
  tls=(--cert-file "$ETCD_TLS_DIR/server.pem" --key-file "$ETCD_TLS_DIR/server-key.pem"
       --trusted-ca-file "$ETCD_TLS_DIR/ca.pem" --client-cert-auth)
  ctl_tls=(--cacert "$ETCD_TLS_DIR/ca.pem" --cert "$ETCD_TLS_DIR/client.pem" --key "$ETCD_TLS_DIR/client-key.pem")
fi
for i in 0 1 2; do
  client=$scheme://127.0.0.1:$((base + 2 * i))
  peer=http://127.0.0.1:$((base + 2 * i + 1))
  # ETCD_UNSUPPORTED_ARCH: Debian's etcd refuses some architectures without it (harmless here)
  ETCD_UNSUPPORTED_ARCH=${ETCD_UNSUPPORTED_ARCH:-} etcd --name "m$i" --data-dir "$dir/m$i" \
    --listen-client-urls "$client" --advertise-client-urls "$client" \
    --listen-peer-urls "$peer" --initial-advertise-peer-urls "$peer" \
    --initial-cluster "$cluster" --initial-cluster-state new \
    --initial-cluster-token "didgate-test-$base" \
    --heartbeat-interval 50 --election-timeout 500 "${tls[@]}" \
    --log-level warn >"$dir/m$i.log" 2>&1 &
  echo "m$i $! $client" >> "$dir/members"
done
# ready when every member answers its health endpoint (a deadline, not a sleep and a hope)
endpoints=$(awk '{print $3}' "$dir/members" | paste -sd, -)
for _ in $(seq 1 100); do
  if ETCDCTL_API=3 etcdctl --endpoints "$endpoints" "${ctl_tls[@]}" endpoint health >/dev/null 2>&1; then
    cat "$dir/members"
    exit 0
  fi
  sleep 0.05
done
echo "etcd did not become healthy within 5 s; logs in $dir" >&2
kill $(awk '{print $2}' "$dir/members") 2>/dev/null || true
exit 1
