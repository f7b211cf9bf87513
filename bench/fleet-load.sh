#!/bin/bash
# Fleet server capacity: flotilla-server on loopback with a fresh database, and examples/fleet-load.rs enrolling
# DEVICES simulated devices that each send a heartbeat every 10 s (spread evenly over the 10 s) for SECONDS.
# Prints each kind of request's count, errors, p50/p90/p99/max and rate, the server's CPU and memory, and the
# database's size after enrollment, after the first heartbeat round and at the end, with the growth extrapolated
# to bytes per device per day, and the rows the heartbeats cost (the server's own count, printed at its exit). Target: 10,000 devices with a heartbeat p99 under 50 ms.
#
# The generator and the server run on the same machine and share its cores (2 here): the figures are a floor for
# a server with the machine to itself.
#
# Usage: bench/fleet-load.sh [DEVICES] [SECONDS]        (defaults: 10000 60)
#   LONG_POLL=1   each device also holds a long poll of its desired state (wait POLL_WAIT, default 30 s); when
#                 two connections per device would pass the descriptor limit, heartbeats share one client pool
#   TICK=2s       the server's --tick (how often it re-plans rollouts; its default is 2s)
#   KEEP=DIR      keep the database and logs in DIR instead of a removed temporary directory
# Needs: cargo, python3 (a free port). Builds the release server and generator (CARGO_TARGET_DIR is honoured).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEVICES=${1:-10000}
RUN_SECONDS=${2:-60}
TICK=${TICK:-2s}
POLL_WAIT=${POLL_WAIT:-30}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}

if [ -n "${KEEP:-}" ]; then
    WORK=$KEEP
    mkdir -p "$WORK"
    rm -f "$WORK"/server.db* "$WORK"/admin-token
else
    WORK=$(mktemp -d)
fi
SERVER_PID=
cleanup() {
    if [ -n "$SERVER_PID" ]; then
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    [ -n "${KEEP:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT

echo "== building (release)"
(cd "$ROOT" && cargo build --quiet --release --features server --bin flotilla-server --example fleet-load)
SERVER=$TARGET/release/flotilla-server
LOAD=$TARGET/release/examples/fleet-load

# Each device keeps a keep-alive connection (two with a long poll): both processes need a descriptor per
# connection, above the usual soft limit of 1024. Raise the soft limit to the hard one for everything started here.
ulimit -n "$(ulimit -Hn)"
FDS=$(ulimit -n)
LOAD_ARGS=()
if [ "${LONG_POLL:-0}" = 1 ]; then
    LOAD_ARGS+=(--long-poll --poll-wait "$POLL_WAIT")
    if [ $((DEVICES * 2 + 256)) -gt "$FDS" ]; then
        LOAD_ARGS+=(--shared-heartbeats)
        echo "   two connections per device would pass the descriptor limit ($FDS): heartbeats share one pool"
    fi
fi
echo "   machine: $(nproc) cores, shared by the server and the generator; descriptor limit $FDS"

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
URL=http://127.0.0.1:$PORT
echo "== starting flotilla-server on $URL (--tick $TICK, database $WORK/server.db)"
FLOTILLA_LOG=warn "$SERVER" serve --listen "127.0.0.1:$PORT" --db "$WORK/server.db" --tick "$TICK" \
    2>"$WORK/server.log" &
SERVER_PID=$!
for _ in $(seq 100); do
    if [ -s "$WORK/admin-token" ] && (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
        break
    fi
    kill -0 "$SERVER_PID" 2>/dev/null || { cat "$WORK/server.log" >&2; exit 1; }
    sleep 0.2
done
"$SERVER" --server "$URL" --token-file "$WORK/admin-token" token create --uses "$DEVICES" \
    >"$WORK/enroll-token"
db_files() { du -cb "$WORK"/server.db* 2>/dev/null | tail -1 | cut -f1; }
echo "   database files before enrollment: $(db_files) bytes"

echo "== generator: $DEVICES devices, $RUN_SECONDS s"
"$LOAD" --server "$URL" --token-file "$WORK/enroll-token" --devices "$DEVICES" --seconds "$RUN_SECONDS" \
    --db "$WORK/server.db" --server-pid "$SERVER_PID" "${LOAD_ARGS[@]}"

# A graceful stop: the last connection to close checkpoints the WAL into the database file.
kill -TERM "$SERVER_PID"
for _ in $(seq 100); do
    kill -0 "$SERVER_PID" 2>/dev/null || break
    sleep 0.2
done
kill -KILL "$SERVER_PID" 2>/dev/null || true
wait "$SERVER_PID" 2>/dev/null || true
SERVER_PID=
echo "== database files after the server stopped (WAL checkpointed): $(db_files) bytes"
# The server prints at exit what the heartbeats cost the database: last_seen and metrics are kept in memory and
# written once per device per flush interval.
WRITES=$(grep "rows written for last_seen" "$WORK/server.log" | tail -1 || true)
if [ -n "$WRITES" ]; then
    echo "== database writes: ${WRITES#flotilla-server: }"
    echo "$WRITES" | awk '{ gsub(/;/, ""); hb = $2; rows = $4; if (hb > 0) printf "   %.3f row writes per heartbeat\n", rows / hb }'
fi
if grep -q -i "panicked\|error" "$WORK/server.log"; then
    echo "== the server logged errors:"
    grep -i "panicked\|error" "$WORK/server.log" | sort | uniq -c | head -10
fi
