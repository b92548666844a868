#!/usr/bin/env bash
# Switchboard load test (issue 4): builds the gateway and the load generator, starts its
# own redis-server (CPU 1) and a fresh gateway per scenario (CPU 0), runs the scenarios
# with the load generator on CPU 1, and writes loadtest/results/<UTC timestamp>/ with one
# JSON per scenario, report.md and latency.svg. Stops everything it started, by PID.
#
#   loadtest/run.sh                   # every scenario (a few minutes)
#   loadtest/run.sh fanout slow       # only these (idle connect-storm fanout spread resume-storm slow beat
#                                     # scale cores cluster)
#   QUICK=1 loadtest/run.sh           # short runs, fewer clients (about a minute)
#   IDLE_HOLD=10 loadtest/run.sh idle # hold the idle connections longer before measuring
#   RESUME_CLIENTS=10000 RESUME_RATE=20 loadtest/run.sh resume-storm   # storm size (2000), ev/s (200)
#   CLUSTER_CLIENTS=3000 CLUSTER_PROJECTS=300 CLUSTER_RATE=1500 CLUSTER_DURATION=10 loadtest/run.sh cluster
#                                     # 3 gateways on one Redis, then on a 3+3 Redis Cluster it starts
#
# Environment: QUICK=1; CARGO_TARGET_DIR (default ./target); GATEWAY_BIN (run this gateway
# binary instead of building one: before/after comparisons); GATEWAY_RUST_LOG (RUST_LOG of
# the gateway, default unset = its own default, info); NO_PIN=1 to skip taskset.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
QUICK="${QUICK:-0}"

ALL=(idle connect-storm fanout spread resume-storm slow beat scale cores cluster)
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
GW_PIDS=()      # the gateways of a several-gateway run (cluster)
CLUSTER_PIDS=() # the redis-servers of the Redis Cluster (cluster)
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
  local rc=$? p
  stop_pid "$GW_PID" 15; GW_PID=""
  for p in "${GW_PIDS[@]}"; do stop_pid "$p" 15; done
  GW_PIDS=()
  for p in "${CLUSTER_PIDS[@]}"; do stop_pid "$p" 5; done
  CLUSTER_PIDS=()
  if [ -f "$RESTART_PIDFILE" ]; then
    p="$(cat "$RESTART_PIDFILE")"
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

# ---- several gateways (cluster): N gateways on CPU 0, each with its own port and instance
# id (CONTAINER_ID), all on the Redis given as one environment assignment (REDIS_URL=... or
# REDIS_CLUSTER_NODES=...; the gateway refuses both at once).
GW_ADDRS=""
start_gateways() { # name, count, redis env assignment
  local name="$1" n="$2" renv="$3" i port a addrs=()
  GW_PIDS=()
  for ((i = 1; i <= n; i++)); do
    port="$("$LG_BIN" free-port)"
    env -u REDIS_URL -u REDIS_CLUSTER_NODES "$renv" SWITCHBOARD_LISTEN="127.0.0.1:$port" \
      CONTAINER_ID="lt-$name-$i" "${PIN_GW[@]}" "$GW_BIN" serve --config config/loadtest.toml \
      >"$OUT/gateway-$name-$i.log" 2>&1 &
    GW_PIDS+=("$!")
    addrs+=("127.0.0.1:$port")
  done
  for a in "${addrs[@]}"; do
    if ! "$LG_BIN" wait-ready --addr "$a" --timeout 30; then
      echo "gateway $a did not become ready; see $OUT/gateway-$name-*.log" >&2
      exit 1
    fi
  done
  GW_ADDRS="$(IFS=,; echo "${addrs[*]}")"
}
stop_gateways() {
  local p
  for p in "${GW_PIDS[@]}"; do stop_pid "$p" 15; done
  GW_PIDS=()
}
run_gateways() { # name, count, redis env assignment, loadgen args...
  local name="$1" n="$2" renv="$3"; shift 3
  echo "== $name"
  start_gateways "$name" "$n" "$renv"
  if ! timeout 300 env -u REDIS_URL -u REDIS_CLUSTER_NODES "$renv" "${LG[@]}" "$@" \
      --gateways "$GW_ADDRS" --gateway-pid "$(IFS=,; echo "${GW_PIDS[*]}")" --out "$OUT/$name.json"; then
    echo "!! $name failed" >&2
    FAILED+=("$name")
  fi
  stop_gateways
}

# ---- a Redis Cluster of 3 masters + 3 replicas on CPU 1 (with the loadgen and the single
# Redis), each node on free ports in its own directory under $OUT/redis-cluster/. Sets
# CLUSTER_NODES (host:port,...) once cluster_state is ok everywhere and every replica is in sync.
CLUSTER_NODES=""
start_redis_cluster() {
  local i port bus dir n ok used=" " nodes=()
  mkdir -p "$OUT/redis-cluster"
  for ((i = 1; i <= 6; i++)); do
    # Two distinct free ports per node (client port, cluster bus), none used twice.
    port="$("$LG_BIN" free-port)"
    while [[ "$used" == *" $port "* ]]; do port="$("$LG_BIN" free-port)"; done
    used+="$port "
    bus="$("$LG_BIN" free-port)"
    while [[ "$used" == *" $bus "* ]]; do bus="$("$LG_BIN" free-port)"; done
    used+="$bus "
    dir="$OUT/redis-cluster/$port"
    mkdir -p "$dir"
    "${PIN_LG[@]}" redis-server --port "$port" --bind 127.0.0.1 --protected-mode yes \
      --cluster-enabled yes --cluster-config-file nodes.conf --cluster-port "$bus" \
      --cluster-node-timeout 5000 --repl-diskless-sync-delay 0 --save "" --appendonly no \
      --daemonize no --loglevel warning --dir "$dir" >"$dir/redis.log" 2>&1 &
    CLUSTER_PIDS+=("$!")
    nodes+=("127.0.0.1:$port")
  done
  for n in "${nodes[@]}"; do "$LG_BIN" wait-redis --redis-url "redis://$n" --timeout 10; done
  if ! redis-cli --cluster create "${nodes[@]}" --cluster-replicas 1 --cluster-yes \
      >"$OUT/redis-cluster/create.log" 2>&1; then
    echo "redis-cli --cluster create failed; see $OUT/redis-cluster/create.log" >&2
    exit 1
  fi
  # Ready when every node says cluster_state:ok and sees 3 masters with slots and 3
  # replicas (none failing or still in handshake), and every replica's link is up.
  for ((i = 0; i < 600; i++)); do # up to 60 s
    ok=1
    for n in "${nodes[@]}"; do
      redis-cli -h 127.0.0.1 -p "${n##*:}" cluster info 2>/dev/null | grep -q '^cluster_state:ok' || { ok=0; break; }
      redis-cli -h 127.0.0.1 -p "${n##*:}" cluster nodes 2>/dev/null | awk '
        $3 ~ /fail|handshake|noaddr/ { bad = 1 }
        $3 ~ /master/ && NF >= 9 { masters++ }
        $3 ~ /slave/ { replicas++ }
        END { exit !(!bad && masters == 3 && replicas == 3) }' || { ok=0; break; }
      if redis-cli -h 127.0.0.1 -p "${n##*:}" info replication 2>/dev/null | grep -q '^role:slave'; then
        redis-cli -h 127.0.0.1 -p "${n##*:}" info replication 2>/dev/null | grep -q '^master_link_status:up' || { ok=0; break; }
      fi
    done
    [ "$ok" = 1 ] && break
    sleep 0.1
  done
  if [ "$ok" != 1 ]; then
    echo "the Redis Cluster did not reach cluster_state:ok with its replicas in sync; see $OUT/redis-cluster/" >&2
    exit 1
  fi
  redis-cli -h 127.0.0.1 -p "${nodes[0]##*:}" cluster nodes >"$OUT/redis-cluster/nodes.txt" 2>&1 || true
  CLUSTER_NODES="$(IFS=,; echo "${nodes[*]}")"
}
stop_redis_cluster() {
  local p n
  # Where the run's keys went: role and key count per node.
  for n in ${CLUSTER_NODES//,/ }; do
    echo "$n $(redis-cli -h 127.0.0.1 -p "${n##*:}" info replication 2>/dev/null | grep '^role:' | tr -d '\r') keys=$(redis-cli -h 127.0.0.1 -p "${n##*:}" dbsize 2>/dev/null)"
  done >"$OUT/redis-cluster/keys.txt"
  for p in "${CLUSTER_PIDS[@]}"; do stop_pid "$p" 5; done
  CLUSTER_PIDS=()
  CLUSTER_NODES=""
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
    cluster)
      # Issue 14: the spread load (clients over many projects, a fixed event rate through
      # the publish script) on three gateways, first on the single Redis above, then on a
      # 3-master + 3-replica Redis Cluster started here. The clients go round-robin over
      # the gateways, every project on each of them; all three gateways share CPU 0.
      CL_ARGS=(spread --clients "${CLUSTER_CLIENTS:-$(q 1500 3000)}" --projects "${CLUSTER_PROJECTS:-$(q 150 300)}"
        --rate "${CLUSTER_RATE:-$(q 1000 1500)}" --duration "${CLUSTER_DURATION:-$(q 4 10)}")
      run_gateways cluster-one-redis 3 "REDIS_URL=$REDIS_URL" "${CL_ARGS[@]}"
      echo "== starting a Redis Cluster (3 masters, 3 replicas)"
      start_redis_cluster
      run_gateways cluster-redis-cluster 3 "REDIS_CLUSTER_NODES=$CLUSTER_NODES" "${CL_ARGS[@]}"
      stop_redis_cluster ;;
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
