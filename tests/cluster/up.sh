#!/usr/bin/env bash
# Starts a real Kubernetes control plane on 127.0.0.1 for the tests, the demo and the benches:
# etcd + kube-apiserver + kube-controller-manager (no scheduler, no kubelet: the node harness plays those).
#
#   tests/cluster/up.sh            build (once, cached) and start; prints the KUBECONFIG to use
#   tests/cluster/down.sh [--purge] stop (and forget the state)
#
# Everything is built from the published Go modules of one Kubernetes release (tests/cluster/kube/go.mod)
# and cached outside the work tree (AZP_CACHE_DIR, default ~/.cache/azp-autoscaler), so a second start
# takes seconds. State (certificates, etcd data, logs, kubeconfig) lives in AZP_CLUSTER_DIR, default
# <repo>/.cache/cluster. Ports: AZP_APISERVER_PORT (default 16443) and the three after it.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
state=${AZP_CLUSTER_DIR:-$repo/.cache/cluster}
cache=${AZP_CACHE_DIR:-$HOME/.cache/azp-autoscaler}
k8s_version=$(sed -n 's/^\tk8s.io\/kubernetes \(v[0-9.]*\)$/\1/p' "$here/kube/go.mod" | head -n1)
# The cache key is the build input's content (never its path: CI clones elsewhere).
bin="$cache/kube-$k8s_version-$(cat "$here/kube/go.mod" "$here/kube/go.sum" "$here/kube/main.go" | sha256sum | cut -c1-12)"
api_port=${AZP_APISERVER_PORT:-16443}
etcd_port=$((api_port + 1))
etcd_peer_port=$((api_port + 2))
kcm_port=$((api_port + 3))
server="https://127.0.0.1:$api_port"

log() { printf '[cluster %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

ready() { curl -sf --max-time 2 --cacert "$state/pki/ca.crt" "$server/readyz" >/dev/null 2>&1; }

if [ -f "$state/kubeconfig" ] && ready; then
  log "already running at $server"
  echo "export KUBECONFIG=$state/kubeconfig"
  exit 0
fi

# ---- 1. Build (cached) ----------------------------------------------------------------------------
build() {
  command -v go >/dev/null || die "Go is needed to build the control plane (https://go.dev/doc/install)"
  mkdir -p "$cache"
  log "building kube-apiserver + kube-controller-manager + etcd $k8s_version from Go modules (cold: ~10-25 min on 2 cores; cached afterwards in $cache)"
  local t0 ld="-s -w" p
  t0=$(date +%s)
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld="$ld -X $p.gitVersion=$k8s_version -X $p.gitMajor=1 -X $p.gitMinor=$(echo "$k8s_version" | cut -d. -f2) -X $p.gitTreeState=clean"
  done
  (cd "$here/kube" && GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=mod \
    go build -trimpath -ldflags "$ld" -o "$bin.tmp" .) || die "go build failed (see the output above)"
  mv "$bin.tmp" "$bin"
  log "built in $(( $(date +%s) - t0 )) s: $bin ($(du -h "$bin" | cut -f1))"
}
[ -x "$bin" ] || build

# ---- 2. Certificates, keys, kubeconfigs (once per state dir) ---------------------------------------
pki="$state/pki"
mkdir -p "$pki" "$state/logs"
if [ ! -f "$pki/ca.crt" ]; then
  log "generating CA, serving and client certificates, service-account signing key in $pki"
  ossl() { openssl "$@" 2>/dev/null; }
  ossl req -x509 -newkey rsa:2048 -nodes -keyout "$pki/ca.key" -out "$pki/ca.crt" -days 3650 \
    -subj "/CN=azp-testbed-ca" -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
  client_cert() { # name CN O
    ossl req -newkey rsa:2048 -nodes -keyout "$pki/$1.key" -out "$pki/$1.csr" -subj "/CN=$2${3:+/O=$3}"
    printf 'extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature,keyEncipherment\n' >"$pki/$1.ext"
    ossl x509 -req -in "$pki/$1.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial -days 3650 \
      -extfile "$pki/$1.ext" -out "$pki/$1.crt"
  }
  ossl req -newkey rsa:2048 -nodes -keyout "$pki/apiserver.key" -out "$pki/apiserver.csr" -subj "/CN=kube-apiserver"
  cat >"$pki/apiserver.ext" <<EOF
extendedKeyUsage=serverAuth
keyUsage=critical,digitalSignature,keyEncipherment
subjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local
EOF
  ossl x509 -req -in "$pki/apiserver.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial -days 3650 \
    -extfile "$pki/apiserver.ext" -out "$pki/apiserver.crt"
  client_cert admin admin system:masters
  client_cert kcm system:kube-controller-manager
  ossl genrsa -out "$pki/sa.key" 2048
  ossl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub"
  rm -f "$pki"/*.csr "$pki"/*.ext
  chmod 600 "$pki"/*.key
  kubeconfig() { # file user cert
    cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: azp-testbed
  cluster:
    server: $server
    certificate-authority-data: $(base64 -w0 <"$pki/ca.crt")
users:
- name: $2
  user:
    client-certificate-data: $(base64 -w0 <"$pki/$3.crt")
    client-key-data: $(base64 -w0 <"$pki/$3.key")
contexts:
- name: azp-testbed
  context: {cluster: azp-testbed, user: $2}
current-context: azp-testbed
EOF
    chmod 600 "$1"
  }
  kubeconfig "$state/kubeconfig" admin admin
  kubeconfig "$state/kcm.kubeconfig" system:kube-controller-manager kcm
fi

# ---- 3. Start the components ------------------------------------------------------------------------
start() { # name args...
  local name=$1; shift
  if [ -f "$state/$name.pid" ] && kill -0 "$(cat "$state/$name.pid")" 2>/dev/null; then return; fi
  # setsid: the components outlive this script and are stopped by down.sh, not by the caller's signals.
  setsid "$bin" "$@" >"$state/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$state/$name.pid"
}
wait_for() { # what seconds check...
  local what=$1 deadline=$(( $(date +%s) + $2 )); shift 2
  until "$@"; do
    [ "$(date +%s)" -lt "$deadline" ] || die "$what did not become ready; last log lines:$(printf '\n'; tail -n 20 "$state/logs/$what.log")"
    sleep 0.2
  done
}

t0=$(date +%s%N)
start etcd etcd --name azp-testbed --data-dir "$state/etcd" \
  --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
  --listen-peer-urls "http://127.0.0.1:$etcd_peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer_port" \
  --initial-cluster "azp-testbed=http://127.0.0.1:$etcd_peer_port" \
  --unsafe-no-fsync --quota-backend-bytes=4294967296 --log-level warn
wait_for etcd 30 curl -sf --max-time 1 -o /dev/null "http://127.0.0.1:$etcd_port/health"

start apiserver apiserver \
  --etcd-servers "http://127.0.0.1:$etcd_port" \
  --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$api_port" \
  --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
  --client-ca-file "$pki/ca.crt" \
  --service-account-issuer "$server" \
  --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
  --service-cluster-ip-range 10.0.0.0/24 \
  --authorization-mode Node,RBAC --allow-privileged=true \
  --max-requests-inflight 800 --max-mutating-requests-inflight 400 \
  --profiling=false --v=1
wait_for apiserver 90 ready

# The simulated Entra fetches the API server's JWKS anonymously, like Entra fetches an AKS issuer's.
curl -sf --cacert "$pki/ca.crt" --cert "$pki/admin.crt" --key "$pki/admin.key" -H 'Content-Type: application/json' \
  -X POST "$server/apis/rbac.authorization.k8s.io/v1/clusterrolebindings" -o /dev/null -d '{
  "apiVersion":"rbac.authorization.k8s.io/v1","kind":"ClusterRoleBinding",
  "metadata":{"name":"azp-testbed:service-account-issuer-discovery"},
  "roleRef":{"apiGroup":"rbac.authorization.k8s.io","kind":"ClusterRole","name":"system:service-account-issuer-discovery"},
  "subjects":[{"apiGroup":"rbac.authorization.k8s.io","kind":"Group","name":"system:unauthenticated"}]}' \
  || true # 409 when it already exists

start controller-manager controller-manager \
  --kubeconfig "$state/kcm.kubeconfig" \
  --authentication-kubeconfig "$state/kcm.kubeconfig" --authorization-kubeconfig "$state/kcm.kubeconfig" \
  --controllers job-controller,garbage-collector-controller,serviceaccount-token-controller,serviceaccount-controller,namespace-controller,root-ca-certificate-publisher-controller,pod-garbage-collector-controller,ttl-after-finished-controller,node-lifecycle-controller,taint-eviction-controller,disruption-controller,deployment-controller,replicaset-controller \
  --service-account-private-key-file "$pki/sa.key" --root-ca-file "$pki/ca.crt" \
  --use-service-account-credentials \
  --kube-api-qps 300 --kube-api-burst 600 --concurrent-job-syncs 20 --concurrent-gc-syncs 20 \
  --leader-elect=false --bind-address 127.0.0.1 --secure-port "$kcm_port" --v=1
wait_for controller-manager 60 curl -sfk --max-time 1 -o /dev/null "https://127.0.0.1:$kcm_port/healthz"

# The default ServiceAccount of `default` appears once the serviceaccount controller runs: a usable cluster.
wait_for controller-manager 60 curl -sf --cacert "$pki/ca.crt" --cert "$pki/admin.crt" --key "$pki/admin.key" \
  "$server/api/v1/namespaces/default/serviceaccounts/default" -o /dev/null

elapsed_ms=$(( ($(date +%s%N) - t0) / 1000000 ))
rss=0
for c in etcd apiserver controller-manager; do
  r=$(awk '/VmRSS/ {print $2}' "/proc/$(cat "$state/$c.pid")/status" 2>/dev/null || echo 0)
  rss=$((rss + r))
done
log "ready at $server in ${elapsed_ms} ms (etcd + kube-apiserver + kube-controller-manager RSS $((rss / 1024)) MiB)"
echo "export KUBECONFIG=$state/kubeconfig"
