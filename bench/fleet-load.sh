#!/bin/bash
# Fleet server capacity: flotilla-server on loopback with a fresh database (SQLite, or a throwaway PostgreSQL
# cluster shared by REPLICAS servers), and examples/fleet-load.rs enrolling DEVICES simulated devices that each send
# a heartbeat every HEARTBEAT seconds (spread evenly over the interval) for SECONDS, device i talking to replica
# i % REPLICAS only (as behind a load balancer with keep-alive).
# Prints each kind of request's count, errors, p50/p90/p99/max and rate, each replica's CPU and memory; with SQLite
# the database's size after enrollment, after the first heartbeat round and at the end, with the growth
# extrapolated to bytes per device per day, and the rows the heartbeats cost (the server's own count, printed at its
# exit); with PostgreSQL its CPU over the run (postmaster and backends) and its commits and rows inserted/updated
# per heartbeat (pg_stat_database). Target: heartbeat and enrollment p99 under 50 ms, no error.
#
# The generator, the servers and PostgreSQL run on the same machine and share its cores (2 here): the figures are
# a floor for a server with the machine to itself.
#
# Usage: bench/fleet-load.sh [DEVICES] [SECONDS]        (defaults: 10000 60)
#   LONG_POLL=1   each device also holds a long poll of its desired state (wait POLL_WAIT, default 30 s); when
#                 two connections per device would pass the descriptor limit, heartbeats share one client pool
#   HEARTBEAT=10  seconds between one device's heartbeats
#   DB=postgres   a throwaway PostgreSQL cluster (initdb under target/, as the postgres user when root; fsync on)
#   REPLICAS=1    servers sharing the PostgreSQL database, each on its own port (DB=postgres for more than one)
#   DB_CONNECTIONS=16  each replica's --db-connections
#   WAKE=1        (with LONG_POLL=1) once every device holds its long poll, order a release to all of them
#                 (app, release of a tiny image pushed to a loopback docker-registry, one-wave rollout) and time
#                 until each poll brings it; needs docker-registry, skopeo
#   TICK=2s       the servers' --tick (how often they re-plan rollouts; the default is 2s)
#   GENERATORS=1  generator processes, each with DEVICES / GENERATORS devices and the replicas j with
#                 j % GENERATORS == its number (REPLICAS a multiple of it): a process holds at most its descriptor
#                 limit of connections, so 100,000 long polls take several; their samples are merged at the end
#   KEEP=DIR      keep the database and logs in DIR instead of a removed temporary directory
# As root the descriptor limit is raised to NOFILE (400000); for large fleets net.ipv4.ip_local_port_range is
# widened to "1024 65000" for the run (restored at exit), and the generator binds its connections from
# LOCAL_ADDRESSES loopback addresses (127.0.0.2...; 16 when the connections pass 50,000): one source address has
# only ~64,000 ports.
# Needs: cargo, python3 (a free port); PostgreSQL's binaries (/usr/lib/postgresql/*/bin) with DB=postgres.
# Builds the release server and generator (CARGO_TARGET_DIR is honoured).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEVICES=${1:-10000}
RUN_SECONDS=${2:-60}
TICK=${TICK:-2s}
POLL_WAIT=${POLL_WAIT:-30}
HEARTBEAT=${HEARTBEAT:-10}
DB=${DB:-sqlite}
REPLICAS=${REPLICAS:-1}
DB_CONNECTIONS=${DB_CONNECTIONS:-16}
GENERATORS=${GENERATORS:-1}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
ROOT_USER=0
[ "$(id -u)" = 0 ] && ROOT_USER=1
case $DB in
    sqlite) [ "$REPLICAS" = 1 ] || { echo "bench/fleet-load.sh: REPLICAS=$REPLICAS needs DB=postgres" >&2; exit 1; } ;;
    postgres) ;;
    *) echo "bench/fleet-load.sh: DB is sqlite or postgres, not $DB" >&2; exit 1 ;;
esac
if [ "$GENERATORS" -lt 1 ] || [ $((REPLICAS % GENERATORS)) != 0 ] || [ $((DEVICES % GENERATORS)) != 0 ]; then
    echo "bench/fleet-load.sh: GENERATORS=$GENERATORS must divide REPLICAS ($REPLICAS) and DEVICES ($DEVICES)" >&2
    exit 1
fi
if [ "${WAKE:-0}" = 1 ]; then
    [ "${LONG_POLL:-0}" = 1 ] || { echo "bench/fleet-load.sh: WAKE=1 needs LONG_POLL=1" >&2; exit 1; }
    [ "$GENERATORS" = 1 ] || { echo "bench/fleet-load.sh: WAKE=1 times one generator's devices: GENERATORS=1" >&2; exit 1; }
    for tool in docker-registry skopeo; do
        command -v "$tool" >/dev/null || { echo "bench/fleet-load.sh: WAKE=1 needs $tool" >&2; exit 1; }
    done
fi

if [ -n "${KEEP:-}" ]; then
    WORK=$KEEP
    mkdir -p "$WORK"
    rm -f "$WORK"/server.db* "$WORK"/admin-token
else
    WORK=$(mktemp -d)
fi
SERVER_PIDS=()
REGISTRY_PID=
PGDIR=
PG_BIN=
PORT_RANGE=
as_pg() {
    if [ "$ROOT_USER" = 1 ]; then runuser -u postgres -- "$PG_BIN/$1" "${@:2}"; else "$PG_BIN/$1" "${@:2}"; fi
}
stop_servers() {
    local pid
    for pid in "${SERVER_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${SERVER_PIDS[@]}"; do
        for _ in $(seq 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    SERVER_PIDS=()
}
cleanup() {
    stop_servers
    if [ -n "$REGISTRY_PID" ]; then kill "$REGISTRY_PID" 2>/dev/null || true; wait "$REGISTRY_PID" 2>/dev/null || true; fi
    if [ -n "$PGDIR" ]; then
        as_pg pg_ctl -D "$PGDIR/data" stop -m fast >/dev/null 2>&1 || true
        [ -n "${KEEP:-}" ] && cp "$PGDIR/server.log" "$WORK/postgres.log" 2>/dev/null
        rm -rf "$PGDIR"
    fi
    [ -z "$PORT_RANGE" ] || sysctl -q -w net.ipv4.ip_local_port_range="$PORT_RANGE" || true
    [ -n "${KEEP:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT

echo "== building (release)"
(cd "$ROOT" && cargo build --quiet --release --features server --bin flotilla-server --example fleet-load)
SERVER=$TARGET/release/flotilla-server
LOAD=$TARGET/release/examples/fleet-load

# Each device keeps a keep-alive connection (two with a long poll): every process needs a descriptor per
# connection, above the usual soft limit of 1024. Root raises the hard limit to NOFILE (fs.nr_open bounds it);
# NOFILE=20000 gives the runs before issue 17 (heartbeats through one shared pool with long polls).
# Per generator process; each replica holds its share of all of them.
PER_GENERATOR=$((DEVICES / GENERATORS))
CONNS=$((PER_GENERATOR * (1 + ${LONG_POLL:-0})))
NOFILE=${NOFILE:-400000}
if [ "$ROOT_USER" = 1 ] && [ "$(ulimit -Hn)" != unlimited ] && [ "$(ulimit -Hn)" -lt "$NOFILE" ]; then
    # A container without CAP_SYS_RESOURCE cannot: the limit stays, and the fleet must fit it.
    ulimit -Hn "$NOFILE" 2>/dev/null ||
        echo "   cannot raise the descriptor limit to $NOFILE (no CAP_SYS_RESOURCE?): it stays $(ulimit -Hn) a process"
fi
ulimit -n "$(ulimit -Hn)"
# The generators' connections come from the ephemeral port range, whose default 28,000 ports are too few for one
# replica's share of them (a port serves one connection to each replica's port).
REPLICA_CONNS=$((CONNS * GENERATORS / REPLICAS))
if [ "$ROOT_USER" = 1 ] && [ "$REPLICA_CONNS" -gt 25000 ]; then
    PORT_RANGE=$(sysctl -n net.ipv4.ip_local_port_range | tr -s '\t ' ' ')
    sysctl -q -w net.ipv4.ip_local_port_range="1024 65000"
fi
FDS=$(ulimit -n)
LOCAL_ADDRESSES=${LOCAL_ADDRESSES:-$([ "$REPLICA_CONNS" -gt 50000 ] && echo 16 || echo 0)}
LOAD_ARGS=(--interval "$HEARTBEAT" --local-addresses "$LOCAL_ADDRESSES")
# Only the first generator reads the database's figures.
FIRST_ARGS=()
[ "${LONG_POLL:-0}" = 1 ] && LOAD_ARGS+=(--long-poll --poll-wait "$POLL_WAIT")
if [ $((CONNS + 256)) -gt "$FDS" ]; then
    LOAD_ARGS+=(--shared-heartbeats)
    CONNS=$((CONNS - DEVICES))
    echo "   a connection per device for heartbeats would pass the descriptor limit ($FDS): heartbeats (and" \
        "enrollments) share one pool"
fi
# Each replica holds its share of the devices' connections, within its descriptors.
MAX_CONNECTIONS=$((CONNS * GENERATORS / REPLICAS + 1000))
[ "$MAX_CONNECTIONS" -ge 20000 ] || MAX_CONNECTIONS=20000
[ "$MAX_CONNECTIONS" -le $((FDS - 500)) ] || MAX_CONNECTIONS=$((FDS - 500))
echo "   machine: $(nproc) cores, shared by the servers, the generator and the database; descriptor limit $FDS;" \
    "local ports $(sysctl -n net.ipv4.ip_local_port_range | tr -s '\t ' ' ')"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

if [ "$DB" = postgres ]; then
    PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
    [ -x "$PG_BIN/initdb" ] || { echo "bench/fleet-load.sh: no PostgreSQL (/usr/lib/postgresql/*/bin)" >&2; exit 1; }
    # Under target/ (the socket path must stay under 107 bytes); the postgres user owns it when we are root.
    PGDIR=$TARGET/bench-pg-$$
    rm -rf "$PGDIR"
    mkdir -p "$PGDIR"
    echo "bench-superuser" >"$PGDIR/pw"
    [ "$ROOT_USER" = 0 ] || chown -R postgres:postgres "$PGDIR"
    as_pg initdb -D "$PGDIR/data" -U postgres --auth-local=trust --auth-host=scram-sha-256 --pwfile "$PGDIR/pw" \
        --no-sync -E UTF8 >"$PGDIR/initdb.log"
    PGPORT=$(free_port)
    as_pg pg_ctl -D "$PGDIR/data" -l "$PGDIR/server.log" -w start \
        -o "-c listen_addresses=127.0.0.1 -p $PGPORT -k $PGDIR -c max_connections=200 -c fsync=on" >/dev/null
    psql_su() { as_pg psql -X -q -v ON_ERROR_STOP=1 -h "$PGDIR" -p "$PGPORT" -U postgres "$@"; }
    psql_su -d postgres -c "CREATE USER flotilla PASSWORD 'bench-secret'"
    psql_su -d postgres -c "CREATE DATABASE flotilla OWNER flotilla"
    DB_ARG="postgres://flotilla:bench-secret@127.0.0.1:$PGPORT/flotilla?sslmode=disable"
    POSTMASTER=$(head -1 "$PGDIR/data/postmaster.pid")
    PG_STATS="$(printf '%q ' "$PG_BIN/psql" -X -tA -F ' ' -h "$PGDIR" -p "$PGPORT" -U postgres -d flotilla -c \
        'SELECT xact_commit, tup_inserted, tup_updated, tup_deleted FROM pg_stat_database WHERE datname = current_database()')"
    [ "$ROOT_USER" = 0 ] || PG_STATS="runuser -u postgres -- $PG_STATS"
    FIRST_ARGS+=(--pg-pid "$POSTMASTER" --pg-stats "$PG_STATS")
    echo "   PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}') on 127.0.0.1:$PGPORT (fsync on," \
        "max_connections 200), data in $PGDIR; each replica holds up to $DB_CONNECTIONS connections"
else
    DB_ARG=$WORK/server.db
    FIRST_ARGS+=(--db "$WORK/server.db")
fi

SERVE_ARGS=(--db-connections "$DB_CONNECTIONS" --max-connections "$MAX_CONNECTIONS" --tick "$TICK")
if [ "${WAKE:-0}" = 1 ]; then
    # A tiny linux/arm/v7 image (the simulated devices' platform) in a loopback registry; nothing runs it.
    RPORT=$(free_port)
    REGISTRY=127.0.0.1:$RPORT
    mkdir -p "$WORK/registry"
    printf 'version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: %s\nhttp:\n  addr: %s\n' \
        "$WORK/registry/storage" "$REGISTRY" >"$WORK/registry/config.yml"
    docker-registry serve "$WORK/registry/config.yml" >"$WORK/registry/registry.log" 2>&1 &
    REGISTRY_PID=$!
    for _ in $(seq 100); do listening "$RPORT" && break; sleep 0.2; done
    python3 - "$WORK/layout" <<'PY'
import gzip, hashlib, io, json, os, sys, tarfile
out = sys.argv[1]
blobs = os.path.join(out, "blobs", "sha256")
os.makedirs(blobs, exist_ok=True)
def put(data):
    d = hashlib.sha256(data).hexdigest()
    open(os.path.join(blobs, d), "wb").write(data)
    return {"digest": "sha256:" + d, "size": len(data)}
raw = io.BytesIO()
with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as t:
    i = tarfile.TarInfo("VERSION"); data = b"wake\n"; i.size = len(data); i.mode = 0o644
    t.addfile(i, io.BytesIO(data))
raw = raw.getvalue()
platform = {"architecture": "arm", "os": "linux", "variant": "v7"}
layer = put(gzip.compress(raw, 1, mtime=0))
config = put(json.dumps(dict(platform, config={"Entrypoint": ["/bin/sh"]},
    rootfs={"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(raw).hexdigest()]})).encode())
manifest = put(json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": dict(config, mediaType="application/vnd.oci.image.config.v1+json"),
    "layers": [dict(layer, mediaType="application/vnd.oci.image.layer.v1.tar+gzip")]}).encode())
index = put(json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
    "manifests": [dict(manifest, mediaType="application/vnd.oci.image.manifest.v1+json", platform=platform)]}).encode())
open(os.path.join(out, "oci-layout"), "w").write('{"imageLayoutVersion":"1.0.0"}')
open(os.path.join(out, "index.json"), "w").write(json.dumps({"schemaVersion": 2, "manifests": [
    dict(index, mediaType="application/vnd.oci.image.index.v1+json",
         annotations={"org.opencontainers.image.ref.name": "v1"})]}))
PY
    echo '{"default":[{"type":"insecureAcceptAnything"}]}' >"$WORK/policy.json"
    timeout 60 skopeo --policy "$WORK/policy.json" copy --quiet --all --dest-tls-verify=false \
        "oci:$WORK/layout:v1" "docker://$REGISTRY/wake:v1"
    SERVE_ARGS+=(--insecure-registry "$REGISTRY")
fi

URLS=()
for k in $(seq 0 $((REPLICAS - 1))); do
    PORT=$(free_port)
    URLS+=("http://127.0.0.1:$PORT")
    echo "== starting flotilla-server replica $k on http://127.0.0.1:$PORT (${SERVE_ARGS[*]})"
    FLOTILLA_LOG=warn "$SERVER" --token-file "$WORK/admin-token" serve --listen "127.0.0.1:$PORT" --db "$DB_ARG" \
        "${SERVE_ARGS[@]}" 2>"$WORK/server-$k.log" &
    SERVER_PIDS+=($!)
    # One at a time: the first makes the schema and the admin token.
    for _ in $(seq 150); do
        if [ -s "$WORK/admin-token" ] && listening "$PORT"; then break; fi
        kill -0 "${SERVER_PIDS[$k]}" 2>/dev/null || { cat "$WORK/server-$k.log" >&2; exit 1; }
        sleep 0.2
    done
done
ctl() { timeout 60 "$SERVER" --server "${URLS[0]}" --token-file "$WORK/admin-token" "$@"; }
TOKEN_ARGS=()
# The rollout selects the devices by a tag, which their token gives them.
[ "${WAKE:-0}" = 1 ] && TOKEN_ARGS+=(--tag site=load)
ctl token create --uses "$DEVICES" "${TOKEN_ARGS[@]}" >"$WORK/enroll-token"
if [ "${WAKE:-0}" = 1 ]; then
    ctl app create wake >/dev/null
    ctl release create wake "$REGISTRY/wake:v1" >/dev/null
    LOAD_ARGS+=(--order-release wake-1 --order "timeout 60 $(printf '%q ' "$SERVER" --server "${URLS[0]}" \
        --token-file "$WORK/admin-token" rollout start wake-1 --select site=load --waves 100 \
        --max-failures "$DEVICES") >$(printf '%q' "$WORK/rollout")")
fi
db_files() { du -cb "$WORK"/server.db* 2>/dev/null | tail -1 | cut -f1; }
[ "$DB" = postgres ] || echo "   database files before enrollment: $(db_files) bytes"

# Generator g drives replicas g, g + GENERATORS, ...; the first also reads the database's figures.
generator_args() {
    local g=$1 k
    GEN_ARGS=(--token-file "$WORK/enroll-token" --devices "$PER_GENERATOR" --seconds "$RUN_SECONDS" "${LOAD_ARGS[@]}")
    for k in $(seq "$g" "$GENERATORS" $((REPLICAS - 1))); do
        GEN_ARGS+=(--server "${URLS[$k]}" --server-pid "${SERVER_PIDS[$k]}")
    done
    [ "$g" != 0 ] || GEN_ARGS+=("${FIRST_ARGS[@]}")
}
if [ "$GENERATORS" = 1 ]; then
    echo "== generator: $DEVICES devices, $RUN_SECONDS s, a heartbeat every $HEARTBEAT s"
    generator_args 0
    "$LOAD" "${GEN_ARGS[@]}"
else
    echo "== $GENERATORS generators of $PER_GENERATOR devices each, $RUN_SECONDS s, a heartbeat every $HEARTBEAT s," \
        "enrolling $((16 / GENERATORS > 0 ? 16 / GENERATORS : 1)) at a time each"
    GEN_PIDS=()
    for g in $(seq 0 $((GENERATORS - 1))); do
        generator_args "$g"
        "$LOAD" "${GEN_ARGS[@]}" --prefix "load$g" --samples "$WORK/samples-$g" \
            --enroll-concurrency $((16 / GENERATORS > 0 ? 16 / GENERATORS : 1)) >"$WORK/generator-$g.out" 2>&1 &
        GEN_PIDS+=($!)
    done
    failed=0
    for pid in "${GEN_PIDS[@]}"; do wait "$pid" || failed=1; done
    echo "== generator 0 (the database's figures are over its run)"
    cat "$WORK/generator-0.out"
    for g in $(seq 1 $((GENERATORS - 1))); do
        echo "== generator $g"
        grep -E "^(fleet-load|server|generator|  error|TARGET)|enrollment:" "$WORK/generator-$g.out" || true
    done
    [ "$failed" = 0 ] || { echo "bench/fleet-load.sh: a generator failed" >&2; exit 1; }
    SAMPLES=()
    for g in $(seq 0 $((GENERATORS - 1))); do SAMPLES+=("$WORK/samples-$g"); done
    "$LOAD" --merge "${SAMPLES[@]}" | tee "$WORK/merged.out"
    # Generator 0 read pg_stat_database over everyone's traffic: per heartbeat means per all generators' heartbeats.
    HEARTBEATS=$(awk '$1 == "heartbeat" { print $2 - $3 }' "$WORK/merged.out")
    sed -n 's/^database writes over the run ([0-9]* heartbeats): \([0-9]*\) commits, \([0-9]*\) rows inserted, \([0-9]*\) updated, \([0-9]*\) deleted.*/\1 \2 \3 \4/p' \
        "$WORK/generator-0.out" | awk -v hb="$HEARTBEATS" 'hb > 0 { printf "database writes per heartbeat of all %d: %.4f commits, %.4f rows inserted, %.4f updated, %.4f deleted\n", hb, $1 / hb, $2 / hb, $3 / hb, $4 / hb }'
fi

if [ "${WAKE:-0}" = 1 ] && [ -s "$WORK/rollout" ]; then
    echo "== the rollout at the end"
    ctl rollout status "$(cat "$WORK/rollout")" >"$WORK/rollout-status" || true
    head -3 "$WORK/rollout-status"
fi
# A graceful stop: with SQLite the last connection to close checkpoints the WAL into the database file.
stop_servers
[ "$DB" = postgres ] || echo "== database files after the server stopped (WAL checkpointed): $(db_files) bytes"
# Each server prints at exit what the heartbeats cost the database: last_seen and metrics are kept in memory and
# written once per device per flush interval.
for k in $(seq 0 $((REPLICAS - 1))); do
    WRITES=$(grep "rows written for last_seen" "$WORK/server-$k.log" | tail -1 || true)
    if [ -n "$WRITES" ]; then
        echo "== replica $k database writes: ${WRITES#flotilla-server: }"
        echo "$WRITES" | awk '{ gsub(/;/, ""); hb = $2; rows = $4; if (hb > 0) printf "   %.3f row writes per heartbeat\n", rows / hb }'
    fi
    if grep -q -i "panicked\|error" "$WORK/server-$k.log"; then
        echo "== replica $k logged errors:"
        grep -i "panicked\|error" "$WORK/server-$k.log" | sort | uniq -c | head -10
    fi
done
