#!/usr/bin/env bash
# Switchboard load test (issue 4): builds the gateway and the load generator, starts its
# own redis-server (CPU 1) and a fresh gateway per scenario (CPU 0), runs the scenarios
# with the load generator on CPU 1, and writes loadtest/results/<UTC timestamp>/ with one
# JSON per scenario, report.md and latency.svg. Stops everything it started, by PID.
#
#   loadtest/run.sh                   # every scenario (a few minutes)
#   loadtest/run.sh fanout slow       # only these (idle connect-storm fanout spread resume-storm slow beat
#                                     # scale cores)
#   QUICK=1 loadtest/run.sh           # short runs, fewer clients (about a minute)
#   IDLE_HOLD=10 loadtest/run.sh idle # hold the idle connections longer before measuring
#   RESUME_CLIENTS=10000 RESUME_RATE=20 loadtest/run.sh resume-storm   # storm size (2000), ev/s (200)
#
# Environment: QUICK=1; CARGO_TARGET_DIR (default ./target); GATEWAY_BIN (run this gateway
# binary instead of building one: before/after comparisons); GATEWAY_RUST_LOG (RUST_LOG of
# the gateway, default unset = its own default, info); NO_PIN=1 to skip taskset.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
QUICK="${QUICK:-0}"

ALL=(idle connect-storm fanout spread resume-storm slow beat scale cores)
if [ "$#" -gt 0 ]; then SCENARIOS=("$@"); else SCENARIOS=("${ALL[@]}"); fi
for s in "${SCENARIOS[@]}"; do
  case " ${ALL[*]} " in *" $s "*) ;; *) echo "unknown scenario: $s (one of: ${ALL[*]})" >&2; exit 2 ;; esac
done

# ---- prerequisites
if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "== installing redis-server"
    apt-get update -qq && apt-get install -y -qq redis-server >/dev/null
  else
    echo "redis-server is required (apt-get install redis-server)" >&2; exit 1
  fi
fi
PIN_GW=() PIN_LG=()
if [ "${NO_PIN:-0}" != 1 ] && command -v taskset >/dev/null 2>&1 && [ "$(nproc)" -ge 2 ]; then
  PIN_GW=(taskset -c 0) PIN_LG=(taskset -c 1)
else
  echo "note: not pinning (taskset missing, NO_PIN=1 or fewer than 2 CPUs)" >&2
fi

if [ -n "${GATEWAY_BIN:-}" ]; then
  # Another build of the gateway (e.g. an earlier commit's, for a before/after comparison).
  GW_BIN="$GATEWAY_BIN"
  [ -x "$GW_BIN" ] || { echo "GATEWAY_BIN=$GW_BIN is not an executable" >&2; exit 2; }
else
  echo "== cargo build --release (gateway)"
  cargo build --release --quiet -p switchboard --bin switchboard
  GW_BIN="$TARGET/release/switchboard"
fi
echo "== cargo build --release (loadgen)"
cargo build --release --quiet -p switchboard-loadtest --bin loadgen
LG_BIN="$TARGET/release/loadgen"

ulimit -n "$(ulimit -Hn)"

OUT="$ROOT/loadtest/results/$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$OUT"

# ---- cleanup: only what this script (or the loadgen for it) started
REDIS_PID="" GW_PID=""
RESTART_PIDFILE="$OUT/.restarted-gateway.pid"
stop_pid() { # pid, seconds to wait after SIGTERM
  local pid="$1" wait_s="${2:-15}" i
  [ -n "$pid" ] || return 0
  kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < wait_s * 10; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  local rc=$?
  stop_pid "$GW_PID" 15; GW_PID=""
  if [ -f "$RESTART_PIDFILE" ]; then
    local p; p="$(cat "$RESTART_PIDFILE")"
    if [ -n "$p" ] && kill -0 "$p" 2>/dev/null; then kill -TERM "$p" 2>/dev/null || true; sleep 1; kill -0 "$p" 2>/dev/null && kill -KILL "$p" 2>/dev/null || true; fi
    rm -f "$RESTART_PIDFILE"
  fi
  stop_pid "$REDIS_PID" 5; REDIS_PID=""
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- Redis, on CPU 1 with the loadgen
RPORT="$("$LG_BIN" free-port)"
"${PIN_LG[@]}" redis-server --port "$RPORT" --bind 127.0.0.1 --save "" --appendonly no \
  --protected-mode yes --daemonize no --loglevel warning >"$OUT/redis.log" 2>&1 &
REDIS_PID=$!
export REDIS_URL="redis://127.0.0.1:$RPORT"
"$LG_BIN" wait-redis --timeout 10

GPORT="$("$LG_BIN" free-port)"
export SWITCHBOARD_LISTEN="127.0.0.1:$GPORT"
SWITCHBOARD_JWT_SECRET="lt-$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')"
export SWITCHBOARD_JWT_SECRET
unset ENVIRONMENT WS_HEARTBEAT_INTERVAL WS_IDLE_TIMEOUT CONTAINER_ID SWITCHBOARD_SHUTDOWN_GRACE
if [ -n "${GATEWAY_RUST_LOG:-}" ]; then export RUST_LOG="$GATEWAY_RUST_LOG"; else unset RUST_LOG; fi

{
  echo "date (UTC):  $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit:      $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD -- src 2>/dev/null || echo ' (src modified)')"
  echo "machine:     $(nproc) CPUs, $(uname -sr), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
  echo "pinning:     gateway '${PIN_GW[*]:-none}', redis+loadgen '${PIN_LG[*]:-none}'"
  echo "config:      config/loadtest.toml; RUST_LOG=${RUST_LOG:-<unset>}; QUICK=$QUICK"
  echo "nofile:      $(ulimit -n)"
} >"$OUT/meta.txt"

start_gateway() { # name
  "${PIN_GW[@]}" "$GW_BIN" serve --config config/loadtest.toml >"$OUT/gateway-$1.log" 2>&1 &
  GW_PID=$!
  if ! "$LG_BIN" wait-ready --timeout 30; then
    echo "gateway did not become ready; see $OUT/gateway-$1.log" >&2
    exit 1
  fi
}
stop_gateway() {
  stop_pid "$GW_PID" 15; GW_PID=""
}

LG=("${PIN_LG[@]}" "$LG_BIN")
q() { if [ "$QUICK" = 1 ]; then echo "$1"; else echo "$2"; fi; }
FAILED=()
run() { # name, loadgen args...
  local name="$1"; shift
  echo "== $name"
  start_gateway "$name"
  if ! timeout 300 "${LG[@]}" "$@" --gateway-pid "$GW_PID" --out "$OUT/$name.json"; then
    echo "!! $name failed" >&2
    FAILED+=("$name")
  fi
  stop_gateway
}

for s in "${SCENARIOS[@]}"; do
  case "$s" in
    idle)
      run idle idle --clients "$(q 2000 10000)" --projects "$(q 20 100)" --hold "${IDLE_HOLD:-$(q 1 3)}" ;;
    connect-storm)
      run connect-storm connect-storm --clients "$(q 2000 10000)" ;;
    fanout)
      run fanout-100 fanout --clients 1000 --rate 100 --duration "$(q 3 10)"
      run fanout-1000 fanout --clients 1000 --rate 1000 --duration "$(q 3 10)" ;;
    spread)
      run spread spread --clients 5000 --projects 500 --rate 2000 --duration "$(q 3 10)" ;;
    beat)
      # Issue 13's repro: the spread load at 18,000 connections with a 5 s heartbeat, over
      # several beats. Before the sweep spread its beats, every beat held fan-out for
      # 100+ ms (p99 115 ms, max 235 ms).
      export WS_HEARTBEAT_INTERVAL="${BEAT_INTERVAL:-5}"
      run beat spread --clients "$(q 6000 18000)" --projects 500 --rate 500 --duration "$(q 6 20)"
      unset WS_HEARTBEAT_INTERVAL ;;
    scale)
      # Issue 13: latency against the number of connections, heartbeats (5 s) inside the
      # window, 500 projects at 2,000 ev/s. SCALE_CLIENTS lists the sizes; each must fit
      # the open-file limit of one process (the gateway holds one descriptor per client).
      export WS_HEARTBEAT_INTERVAL="${BEAT_INTERVAL:-5}"
      for n in ${SCALE_CLIENTS:-$(q "2000 5000" "5000 10000 18000")}; do
        if [ "$n" -gt $(( $(ulimit -n) - 500 )) ]; then
          echo "!! scale-$n skipped: $n clients need more than ulimit -n = $(ulimit -n) descriptors" >&2
          FAILED+=("scale-$n"); continue
        fi
        run "scale-$n" spread --clients "$n" --projects 500 --rate 2000 --duration "$(q 6 16)"
      done
      unset WS_HEARTBEAT_INTERVAL ;;
    cores)
      # Issue 13: fan-out on every core. The gateway on both CPUs with 1, then 2, runtime
      # worker threads (TOKIO_WORKER_THREADS); the per-thread CPU split comes from
      # /proc/PID/task/*/stat. The loadgen and Redis stay on CPU 1, so with 2 workers the
      # gateway's second thread shares that CPU with them. CORES_RATES: ev/s (1000 2000).
      SAVED_PIN=("${PIN_GW[@]}")
      if [ ${#PIN_GW[@]} -gt 0 ]; then PIN_GW=(taskset -c 0,1); fi
      for w in 1 2; do
        export TOKIO_WORKER_THREADS=$w
        for rate in ${CORES_RATES:-1000 2000}; do
          run "cores-w$w-$rate" fanout --clients 1000 --rate "$rate" --duration "$(q 4 10)"
        done
      done
      unset TOKIO_WORKER_THREADS
      PIN_GW=("${SAVED_PIN[@]}") ;;
    resume-storm)
      # The loadgen SIGTERMs this gateway mid-run and starts a new one (pid in the pid
      # file, stopped by the loadgen itself, or by our trap if it dies first).
      echo "== resume-storm"
      start_gateway resume-storm
      if ! timeout 300 "${LG[@]}" resume-storm --clients "${RESUME_CLIENTS:-$(q 500 2000)}" --rate "${RESUME_RATE:-200}" \
          --duration "$(q 5 8)" --restart-after 2 --gateway-pid "$GW_PID" \
          --gateway-bin "$GW_BIN" --gateway-config config/loadtest.toml \
          --gateway-cpu "$([ ${#PIN_GW[@]} -gt 0 ] && echo 0 || true)" \
          --gateway-log "$OUT/gateway-resume-storm-restarted.log" --pid-file "$RESTART_PIDFILE" \
          --out "$OUT/resume-storm.json"; then
        echo "!! resume-storm failed" >&2
        FAILED+=(resume-storm)
      fi
      stop_gateway
      if [ -f "$RESTART_PIDFILE" ]; then
        p="$(cat "$RESTART_PIDFILE")"
        if kill -0 "$p" 2>/dev/null; then kill -TERM "$p" 2>/dev/null || true; sleep 2; kill -0 "$p" 2>/dev/null && kill -KILL "$p" 2>/dev/null || true; fi
        rm -f "$RESTART_PIDFILE"
      fi ;;
    slow)
      run slow slow --clients 1000 --slow 100 --rate 1000 --pad 1024 --duration "$(q 7 10)" ;;
  esac
done

"$LG_BIN" report --dir "$OUT" >/dev/null
echo
cat "$OUT/report.md"
echo
echo "results: $OUT"
if [ "${#FAILED[@]}" -gt 0 ]; then
  echo "failed: ${FAILED[*]}" >&2
  exit 1
fi
