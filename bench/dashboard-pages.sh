#!/bin/bash
# Dashboard page speed at fleet scale: flotilla-server on loopback over a database seeded with DEVICES devices
# (default 100,000), each with a platform (four kinds), tags, an app ordered at a release, its app status, its
# latest update report (most committed, some failed, some still preparing) and two update events; one device has a
# week of metrics samples. The script signs in as the operator and times each page RUNS times (default 20) with
# curl's time to first byte over loopback (the server renders a page whole before sending it, so this is the
# server's time plus a loopback round trip), and prints p50/p95/max. Target: under 200 ms for each page.
#
# Usage: bench/dashboard-pages.sh [DEVICES] [RUNS]        (defaults: 100000 20)
#   KEEP=DIR      keep the database and logs in DIR instead of a removed temporary directory
# Needs: cargo, python3 (its sqlite3 module seeds the database), curl. Builds the release server
# (CARGO_TARGET_DIR is honoured).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEVICES=${1:-100000}
RUNS=${2:-20}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}

if [ -n "${KEEP:-}" ]; then
    WORK=$KEEP
    mkdir -p "$WORK"
    rm -f "$WORK"/server.db* "$WORK"/admin-token "$WORK"/cookies
else
    WORK=$(mktemp -d)
fi
SERVER_PID=
stop_server() {
    if [ -n "$SERVER_PID" ]; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
        SERVER_PID=
    fi
}
cleanup() {
    stop_server
    [ -n "${KEEP:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT

echo "== building (release)"
(cd "$ROOT" && cargo build --quiet --release --features server --bin flotilla-server)
SERVER=$TARGET/release/flotilla-server

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
URL=http://127.0.0.1:$PORT
start_server() {
    FLOTILLA_LOG=warn "$SERVER" serve --listen "127.0.0.1:$PORT" --db "$WORK/server.db" 2>>"$WORK/server.log" &
    SERVER_PID=$!
    for _ in $(seq 100); do
        if [ -s "$WORK/admin-token" ] && (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
            return
        fi
        kill -0 "$SERVER_PID" 2>/dev/null || { cat "$WORK/server.log" >&2; exit 1; }
        sleep 0.2
    done
    echo "the server did not start" >&2
    exit 1
}

# The first start makes the schema (its migrations) and the admin token; the app is made through the API so its
# settings are what the server itself writes.
start_server
curl -sf -H "Authorization: Bearer $(cat "$WORK/admin-token")" -H 'content-type: application/json' \
    -d '{"name": "sensor"}' "$URL/v1/apps" >/dev/null
stop_server

echo "== seeding $DEVICES devices into $WORK/server.db"
SEED_START=$(date +%s.%N)
python3 - "$WORK/server.db" "$DEVICES" <<'EOF'
import json, random, sqlite3, sys, time

path, n = sys.argv[1], int(sys.argv[2])
random.seed(18)
now = int(time.time())
platforms = [
    ["linux/arm/v6"],
    ["linux/arm/v7", "linux/arm/v6"],
    ["linux/arm64", "linux/arm/v7", "linux/arm/v6"],
    ["linux/amd64"],
]
descriptions = ["Raspberry Pi Zero W (ARM1176)", "Raspberry Pi 2 (Cortex-A7)", "Raspberry Pi 4 (Cortex-A72)", "NUC"]
db = sqlite3.connect(path)
db.execute("PRAGMA synchronous = OFF")
digest = lambda s: "sha256:" + format(abs(hash(s)), "064x")[:64]
for r in ("sensor-1", "sensor-2"):
    manifests = {p: digest(r + p) for p in ["linux/arm/v6", "linux/arm/v7", "linux/arm64", "linux/amd64"]}
    db.execute("INSERT INTO releases (id, app, image, pinned, manifests, created) VALUES (?, 'sensor', ?, ?, ?, ?)",
               (r, "registry.example/sensor:" + r, "registry.example/sensor@" + digest(r), json.dumps(manifests), now))

def metrics(cpu):
    return json.dumps({"cpu_percent": cpu, "memory_used": 200 << 20, "memory_total": 512 << 20,
                       "disk_used": 3 << 30, "disk_total": 16 << 30, "uptime": 86400, "load": [0.5, 0.4, 0.3],
                       "temperature_celsius": 51.0, "dead_letters": 0})

devices, desired, apps, updates, events = [], [], [], [], []
for i in range(n):
    k = i % 4
    dev = "d%015d" % i
    name = "dev-%06d" % i
    # 5 % silent for two days (offline), the rest heard from within the last minute.
    last_seen = now - (2 * 86400 if i % 20 == 7 else random.randint(0, 60))
    tags = {"site": "site-%d" % (i % 50), "ring": "canary" if i % 10 == 0 else "stable"}
    platform = {"candidates": platforms[k], "page_size": 16384 if k == 2 and i % 8 == 2 else 4096,
                "description": descriptions[k]}
    devices.append((dev, name, "h" + dev, json.dumps(tags), json.dumps(platform), "0.1.0", now - 30 * 86400,
                    last_seen, metrics(random.random() * 100)))
    desired.append((dev, "sensor", "sensor-2"))
    # 90 % committed sensor-2, 2 % rolled back from it (failed), the rest still preparing it (updating).
    roll = i % 50
    if roll == 3:
        report = {"event": "rolled-back", "release": "sensor-2", "to": "sensor-1",
                  "reason": "wrong architecture variant: SIGILL", "wrong_variant": True}
        running = "sensor-1"
    elif roll < 3 or roll > 47:
        report = {"event": "preparing", "release": "sensor-2"}
        running = "sensor-1"
    else:
        report = {"event": "committed", "release": "sensor-2"}
        running = "sensor-2"
    apps.append((dev, "sensor", json.dumps({"app": "sensor", "release": running, "manifest": digest(running),
                 "platform": platforms[k][0], "state": "running", "restarts": 0, "health": "healthy",
                 "wrong_variant": None})))
    updates.append((dev, "sensor", "sensor-2", json.dumps(report), now - 3600, now - 3600, 2))
    events.append((dev, "u1-" + dev, now - 7200, now - 7200,
                   json.dumps({"kind": "update", "data": {"app": "sensor",
                               "report": {"event": "preparing", "release": "sensor-2"}}})))
    events.append((dev, "u2-" + dev, now - 3600, now - 3600,
                   json.dumps({"kind": "update", "data": {"app": "sensor", "report": report}})))

db.executemany("INSERT INTO devices (id, name, credential_hash, tags, platform, agent_version, enrolled, last_seen, "
               "metrics) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", devices)
db.executemany("INSERT INTO desired (device, app, release) VALUES (?, ?, ?)", desired)
db.executemany("INSERT INTO device_apps (device, app, status) VALUES (?, ?, ?)", apps)
db.executemany("INSERT INTO device_updates (device, app, release, report, at, received, seq) "
               "VALUES (?, ?, ?, ?, ?, ?, ?)", updates)
db.executemany("INSERT INTO events (device, id, at, received, body) VALUES (?, ?, ?, ?, ?)", events)
# A week of samples, one every 5 min, for the device whose page is timed.
one = "d%015d" % (n // 2)
# As the server keeps them: only what the charts read.
sample = lambda cpu: json.dumps({"cpu_percent": cpu, "memory_used": 200 << 20, "memory_total": 512 << 20,
                                 "disk_used": 3 << 30, "disk_total": 16 << 30, "temperature_celsius": 51.0},
                                separators=(",", ":"))
db.executemany("INSERT INTO device_samples (device, at, metrics) VALUES (?, ?, ?)",
               [(one, now - 7 * 86400 + j * 300, sample(random.random() * 100)) for j in range(2016)])
db.commit()
db.execute("ANALYZE")
db.close()
EOF
echo "   seeded in $(echo "$(date +%s.%N) - $SEED_START" | bc) s; database files: $(du -cb "$WORK"/server.db* | tail -1 | cut -f1) bytes"

start_server
echo "== signing in to $URL"
curl -sf -o /dev/null -c "$WORK/cookies" --data-urlencode "token=$(cat "$WORK/admin-token")" \
    --data-urlencode "next=/" "$URL/signin"

ONE=$(printf 'dev-%06d' $((DEVICES / 2)))
printf '%-45s %9s %9s %9s %9s\n' page p50/ms p95/ms max/ms bytes
for path in / /devices "/devices?state=failed" "/devices?state=updating" "/devices?state=running" "/devices?platform=linux%2Farm%2Fv6&page=100" \
    "/devices?tag=site%3Dsite-7&seen=1h" "/devices?q=12345" "/devices/$ONE"; do
    times=()
    size=0
    for _ in $(seq "$RUNS"); do
        out=$(curl -s -o /dev/null -b "$WORK/cookies" -w '%{http_code} %{time_starttransfer} %{size_download}' \
            "$URL$path")
        read -r code t size <<<"$out"
        if [ "$code" != 200 ]; then
            echo "GET $path answered $code" >&2
            exit 1
        fi
        times+=("$t")
    done
    printf '%s\n' "${times[@]}" | sort -n | awk -v path="$path" -v size="$size" '
        { t[NR] = $1 * 1000 }
        END {
            p50 = t[int((NR + 1) / 2)]; i95 = int(NR * 0.95 + 0.999); if (i95 > NR) i95 = NR
            printf "%-45s %9.1f %9.1f %9.1f %9d\n", path, p50, t[i95], t[NR], size
        }'
done
if grep -q -i "panicked\|error" "$WORK/server.log"; then
    echo "== the server logged errors:"
    grep -i "panicked\|error" "$WORK/server.log" | sort | uniq -c | head -10
fi
