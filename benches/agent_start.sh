#!/usr/bin/env bash
# Start overhead of the agent entrypoint: from exec to `config.sh` started, excluding the token exchange.
#
# Compared with the flow of the published guides (a bash start.sh that calls the `az` CLI twice, for the
# federated login and for the access token, then runs config.sh with the token on its command line).
# Network is excluded on both sides: ours reads a PAT file (no Entra exchange), and each `az` call is
# measured by its local cost (`az account show` with an empty profile: interpreter start, CLI import,
# profile load, no request). The guides' per-start agent download is not counted either (ours has none).
#
# A benchmark, not a test: it prints numbers and asserts nothing.
#
#   benches/agent_start.sh [ITERATIONS]      default 30
#   AZ=/path/to/az benches/agent_start.sh    the az CLI to compare with (default: `az` on PATH; skipped if none)
#   AZP_BIN=/path/to/azp-autoscaler …        default: target/debug/azp-autoscaler (cargo build --bin azp-autoscaler)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
iterations=${1:-30}
bin=${AZP_BIN:-$repo/target/debug/azp-autoscaler}
az_bin=${AZ:-$(command -v az || true)}
if [ ! -x "$bin" ]; then
  echo "no $bin: run \`cargo build --bin azp-autoscaler\` first (or set AZP_BIN)" >&2
  exit 1
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
agent="$work/agent"
mkdir -p "$agent/bin" "$work/azure"
stamp="$work/stamp"

# config.sh: note the instant it starts, then stop whoever started it (the measurement ends here).
cat > "$agent/config.sh" <<'EOF'
#!/bin/sh
date +%s%N > "$BENCH_STAMP"
[ -n "$BENCH_KILL_PARENT" ] && kill -KILL "$PPID" 2>/dev/null
exit 0
EOF
printf '#!/bin/sh\nexit 0\n' > "$agent/bin/Agent.Listener"
chmod +x "$agent/config.sh" "$agent/bin/Agent.Listener"
printf 'bench-pat-not-a-secret-0123456789\n' > "$work/pat"

# The guides' flow, in outline: check settings, get a token with two az calls, hide the token variables
# as capabilities, run config.sh with the token in argv.
cat > "$work/start.sh" <<'EOF'
#!/bin/bash
set -e
for v in AZP_URL AZP_POOL AZP_AGENT_NAME; do
  if [ -z "${!v}" ]; then echo "error: missing $v" >&2; exit 1; fi
done
if [ -n "$BENCH_AZ" ]; then
  "$BENCH_AZ" account show >/dev/null 2>&1 || true   # stands for: az login --federated-token …
  "$BENCH_AZ" account show >/dev/null 2>&1 || true   # stands for: az account get-access-token …
fi
AZP_TOKEN_FILE="$BENCH_PAT"
export VSO_AGENT_IGNORE=AZP_TOKEN,AZP_TOKEN_FILE
cd "$BENCH_AGENT"
./config.sh --unattended --agent "$AZP_AGENT_NAME" --url "$AZP_URL" --auth PAT \
  --token "$(cat "$AZP_TOKEN_FILE")" --pool "$AZP_POOL" --work "${AZP_WORK:-_work}" --replace
EOF
chmod +x "$work/start.sh"

common_env=(
  PATH="$PATH" HOME="$work" BENCH_STAMP="$stamp" BENCH_PAT="$work/pat" BENCH_AGENT="$agent"
  AZP_URL="https://127.0.0.1:9/bench" AZP_POOL=bench AZP_AGENT_NAME=bench-1
  AZURE_CONFIG_DIR="$work/azure" AZURE_CORE_COLLECT_TELEMETRY=false AZURE_CORE_NO_COLOR=true
)

# One measurement: nanoseconds from just before exec to config.sh's first line. $1: kill the parent of
# config.sh once it started (the entrypoint or start.sh) or not (the baseline).
measure() {
  local kill_parent=$1
  shift
  rm -f "$stamp"
  local t0
  t0=$(date +%s%N)
  env -i "${common_env[@]}" BENCH_KILL_PARENT="$kill_parent" "$@" >/dev/null 2>&1 || true
  if [ ! -s "$stamp" ]; then
    echo "config.sh did not start for: $*" >&2
    exit 1
  fi
  echo $(( $(cat "$stamp") - t0 ))
}

# Median and 90th percentile (ms) of nanosecond samples on stdin.
summary() {
  sort -n | awk '{ v[NR] = $1 } END {
    m = v[int((NR + 1) / 2)]; p = v[int(NR * 0.9 + 0.999)];
    printf "%.1f %.1f\n", m / 1e6, p / 1e6 }'
}

run() {
  local name=$1 kill_parent=$2
  shift 2
  local samples=()
  for _ in $(seq "$iterations"); do
    samples+=("$(measure "$kill_parent" "$@")")
  done
  read -r median p90 < <(printf '%s\n' "${samples[@]}" | summary)
  printf '%-44s median %8.1f ms   p90 %8.1f ms\n' "$name" "$median" "$p90"
  echo "$median" > "$work/result-$(echo "$name" | tr -c 'a-z0-9' '_')"
}

echo "start overhead, exec -> config.sh started, $iterations runs each ($(nproc) cores)"
run "baseline: exec config.sh directly" "" "$agent/config.sh"
run "azp-autoscaler agent (PAT file, no exchange)" 1 "$bin" agent --auth pat --pat-file "$work/pat" --agent-dir "$agent"
run "bash start.sh without az" 1 "$work/start.sh"
ours=$(cat "$work"/result-azp_autoscaler_agent*)
if [ -n "$az_bin" ]; then
  run "bash start.sh + 2 x az (local cost only)" 1 env BENCH_AZ="$az_bin" "$work/start.sh"
  theirs=$(cat "$work"/result-bash_start_sh___2*)
  awk -v a="$theirs" -v b="$ours" 'BEGIN { printf "ratio (bash + az) / azp-autoscaler: %.1fx\n", a / b }'
else
  echo "no az CLI found (set AZ=…): the bash + az comparison is skipped"
fi
