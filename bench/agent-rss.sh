#!/bin/bash
# Agent memory: one `flotilla agent` (release build) enrolled with a loopback flotilla-server, running one app
# (busybox from a loopback docker-registry, under runc). Measures, from /proc/PID/status:
#   - idle: the agent's VmRSS (min and max over IDLE_SECONDS, default 20) and VmHWM once release 1 is committed
#     and steady;
#   - update peak: the agent's VmHWM across the update to release 2 (the peak is reset through
#     /proc/PID/clear_refs just before the rollout starts, so enrollment and the first install do not count);
#   - the supervisor (`flotilla supervise demo`, one process per container) separately, at idle and after the update.
# Targets: agent idle <= 8 MiB, update peak <= 32 MiB. VmRSS counts the binary's pages mapped from the page cache
# (shared with every supervisor, and reclaimable): the breakdown shows anonymous memory, file pages, the binary's
# own mapping and PSS apart.
#
# Usage: sudo bench/agent-rss.sh            (root: runc needs it)
#   IDLE_SECONDS=20   how long the steady agent is sampled
#   KEEP=DIR          keep the logs and state in DIR instead of a removed temporary directory
#   FLOTILLA=PATH     measure this flotilla binary (another profile, say) instead of building target/release/flotilla
#   The agent inherits the environment: MALLOC_ARENA_MAX=1 bench/agent-rss.sh measures glibc with one arena.
#   COLD=1            run a copy of the binary whose pages were dropped from the page cache (as after a boot): only
#                     the pages the processes touch, and their readahead, become resident
# Needs: docker-registry, skopeo, runc, python3, and the busybox-static fixture for this machine's architecture
# ($FLOTILLA_BUSYBOX_DIR/<arch>/busybox, default target/test-fixtures/busybox, which tests/setup fetches).
# Everything listens on 127.0.0.1; the container, the agent, the server and the registry are removed on exit.
set -euo pipefail
exec 4>&2 # stderr, for messages from functions whose output wait_for discards

ROOT=$(cd "$(dirname "$0")/.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
IDLE_SECONDS=${IDLE_SECONDS:-20}
[ "$(id -u)" = 0 ] || { echo "bench/agent-rss.sh: run as root (runc needs it)" >&2; exit 1; }
for tool in docker-registry skopeo runc python3; do
    command -v "$tool" >/dev/null || { echo "bench/agent-rss.sh: $tool is missing" >&2; exit 1; }
done
case $(uname -m) in
    x86_64) ARCH=amd64 ;;
    aarch64) ARCH=arm64 ;;
    armv7l) ARCH=armhf ;;
    *) echo "bench/agent-rss.sh: no busybox fixture for $(uname -m)" >&2; exit 1 ;;
esac
BUSYBOX=${FLOTILLA_BUSYBOX_DIR:-$TARGET/test-fixtures/busybox}/$ARCH/busybox
[ -x "$BUSYBOX" ] || { echo "bench/agent-rss.sh: $BUSYBOX is missing (run tests/setup)" >&2; exit 1; }

if [ -n "${KEEP:-}" ]; then
    WORK=$KEEP
    mkdir -p "$WORK"
else
    WORK=$(mktemp -d)
fi
REGISTRY_PID= SERVER_PID= AGENT_PID=
BUILD_AGENT=1
if [ -n "${FLOTILLA:-}" ]; then BUILD_AGENT=0; else FLOTILLA=$TARGET/release/flotilla; fi
SERVER=$TARGET/release/flotilla-server
STATE=$WORK/agent/state
CONFIG=$WORK/agent/config.toml
cleanup() {
    local rc=$?
    if [ -n "$AGENT_PID" ]; then kill "$AGENT_PID" 2>/dev/null || true; wait "$AGENT_PID" 2>/dev/null || true; fi
    # The supervisors outlive their agent by design: remove the container, which stops its supervisor.
    if [ -d "$STATE" ]; then
        timeout 30 "$FLOTILLA" --config "$CONFIG" --state-dir "$STATE" rm -f demo >/dev/null 2>&1 || true
    fi
    for pid in $SERVER_PID $REGISTRY_PID; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if [ "$rc" != 0 ]; then
        for log in server.log registry/registry.log agent/agent.log; do
            [ -f "$WORK/$log" ] && { echo "--- $log (last lines)"; tail -8 "$WORK/$log"; }
        done
    fi
    [ -n "${KEEP:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# wait_for SECONDS WHAT COMMAND...: runs COMMAND every half second until it succeeds, or fails the script.
wait_for() {
    local limit=$1 what=$2
    shift 2
    for _ in $(seq $((limit * 2))); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.5
    done
    echo "bench/agent-rss.sh: timed out after ${limit}s waiting for $what" >&2
    return 1
}
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1"); }
# kib PID FIELD: a VmRSS/VmHWM line of /proc/PID/status, in KiB.
kib() {
    [ -r "/proc/$1/status" ] || { echo "bench/agent-rss.sh: process $1 is gone" >&4; return 1; }
    awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"
}
mib() { awk -v k="$1" 'BEGIN { printf "%.1f MiB", k / 1024 }'; }
# breakdown PID: anonymous and file pages, the binary's own mapping, PSS, threads.
breakdown() {
    local anon file bin pss threads
    anon=$(kib "$1" RssAnon)
    file=$(kib "$1" RssFile)
    threads=$(awk '$1 == "Threads:" { print $2 }' "/proc/$1/status")
    pss=$(awk '$1 == "Pss:" { print $2 }' "/proc/$1/smaps_rollup")
    bin=$(awk -v exe="$(readlink "/proc/$1/exe")" '
        /^[0-9a-f]+-[0-9a-f]+ / { mine = ($6 == exe) }
        mine && $1 == "Rss:" { sum += $2 }
        END { print sum + 0 }' "/proc/$1/smaps")
    echo "anon $(mib "$anon"), file $(mib "$file") (of which the binary $(mib "$bin")), PSS $(mib "$pss"), $threads threads"
}
# The supervisor of the app's container: `flotilla --state-dir STATE supervise demo`.
supervisor_pid() {
    local p
    for p in /proc/[0-9]*; do
        if { tr "\0" " " <"$p/cmdline"; } 2>/dev/null | grep -q -- "--state-dir $STATE supervise demo"; then
            echo "${p#/proc/}"
            return 0
        fi
    done
    return 1
}

echo "== building (release): the server, then the agent without the server feature (unless FLOTILLA is set)"
(cd "$ROOT" && cargo build --quiet --release --features server --bin flotilla-server)
[ "$BUILD_AGENT" = 0 ] || (cd "$ROOT" && cargo build --quiet --release --bin flotilla)

if [ "${COLD:-0}" = 1 ]; then
    cp "$FLOTILLA" "$WORK/flotilla"
    FLOTILLA=$WORK/flotilla
    python3 -c 'import os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); os.fsync(fd)
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)' "$FLOTILLA"
    echo "   cold start: $FLOTILLA, $(fincore --noheadings --output PAGES "$FLOTILLA") pages of it in the page cache"
fi

echo "== registry and images"
RPORT=$(free_port)
REGISTRY=127.0.0.1:$RPORT
mkdir -p "$WORK/registry"
cat >"$WORK/registry/config.yml" <<EOF
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $WORK/registry/storage
http:
  addr: $REGISTRY
EOF
docker-registry serve "$WORK/registry/config.yml" >"$WORK/registry/registry.log" 2>&1 &
REGISTRY_PID=$!
wait_for 20 "the registry" listening "$RPORT"

# An OCI layout per release: an index with one linux/$ARCH image, whose single layer holds busybox, /bin/sh and
# /VERSION (the release's name, so each release has its own digests).
python3 - "$WORK/layout" "$BUSYBOX" "$ARCH" <<'EOF'
import gzip, hashlib, io, json, os, sys, tarfile
out, busybox, arch = sys.argv[1:]
blobs = os.path.join(out, "blobs", "sha256")
os.makedirs(blobs, exist_ok=True)
def put(data):
    d = hashlib.sha256(data).hexdigest()
    open(os.path.join(blobs, d), "wb").write(data)
    return {"digest": "sha256:" + d, "size": len(data)}
platform = {"architecture": arch, "os": "linux"}
if arch == "arm64": platform["variant"] = "v8"
if arch == "armhf": platform.update(architecture="arm", variant="v7")
tags = []
for tag in ["v1", "v2"]:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as t:
        def add(name, data=None, kind=tarfile.REGTYPE, mode=0o755, link=""):
            i = tarfile.TarInfo(name); i.type = kind; i.mode = mode; i.linkname = link
            i.size = len(data) if data is not None else 0
            t.addfile(i, io.BytesIO(data) if data is not None else None)
        add("bin/", kind=tarfile.DIRTYPE)
        add("bin/busybox", open(busybox, "rb").read())
        add("bin/sh", kind=tarfile.SYMTYPE, mode=0o777, link="busybox")
        add("VERSION", (tag + "\n").encode(), mode=0o644)
    raw = raw.getvalue()
    layer = put(gzip.compress(raw, 1, mtime=0))
    config = dict(platform, config={"Entrypoint": ["/bin/sh"], "Env": ["PATH=/bin"]},
                  rootfs={"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(raw).hexdigest()]})
    config = put(json.dumps(config).encode())
    manifest = put(json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": dict(config, mediaType="application/vnd.oci.image.config.v1+json"),
        "layers": [dict(layer, mediaType="application/vnd.oci.image.layer.v1.tar+gzip")]}).encode())
    index = put(json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [dict(manifest, mediaType="application/vnd.oci.image.manifest.v1+json",
                           platform=platform)]}).encode())
    tags.append(dict(index, mediaType="application/vnd.oci.image.index.v1+json",
                     annotations={"org.opencontainers.image.ref.name": tag}))
open(os.path.join(out, "oci-layout"), "w").write('{"imageLayoutVersion":"1.0.0"}')
open(os.path.join(out, "index.json"), "w").write(json.dumps({"schemaVersion": 2, "manifests": tags}))
EOF
echo '{"default":[{"type":"insecureAcceptAnything"}]}' >"$WORK/policy.json"
for tag in v1 v2; do
    timeout 60 skopeo --policy "$WORK/policy.json" copy --quiet --all --dest-tls-verify=false \
        "oci:$WORK/layout:$tag" "docker://$REGISTRY/demo:$tag"
done

echo "== fleet server"
PORT=$(free_port)
URL=http://127.0.0.1:$PORT
FLOTILLA_LOG=info "$SERVER" serve --listen "127.0.0.1:$PORT" --db "$WORK/server.db" \
    --insecure-registry "$REGISTRY" --tick 1s 2>"$WORK/server.log" &
SERVER_PID=$!
wait_for 20 "the server" listening "$PORT"
wait_for 10 "the admin token" test -s "$WORK/admin-token"
ctl() { timeout 30 "$SERVER" --server "$URL" --token-file "$WORK/admin-token" "$@"; }
ctl token create --uses 1 >"$WORK/enroll-token"
ctl app create demo --restart always --stop-timeout 2s -- -c \
    'busybox cat /VERSION; while :; do busybox sleep 1; done' >/dev/null
ctl release create demo "$REGISTRY/demo:v1" >/dev/null

echo "== agent"
mkdir -p "$WORK/agent"
cat >"$CONFIG" <<EOF
[fleet]
server = "$URL"
token_file = "$WORK/enroll-token"
name = "rss"
tags = { site = "lab" }
poll_interval = "30s"
probation = "5s"
heartbeat_interval = "10s"
[[registry]]
host = "$REGISTRY"
insecure = true
EOF
env -u NOTIFY_SOCKET -u JOURNAL_STREAM FLOTILLA_LOG=info \
    "$FLOTILLA" --config "$CONFIG" --state-dir "$STATE" agent 2>"$WORK/agent/agent.log" &
AGENT_PID=$!
enrolled() { ctl --json devices | python3 -c 'import json,sys; sys.exit(len(json.load(sys.stdin)) != 1)'; }
wait_for 60 "the device to enroll" enrolled
# rollout_done ID: the rollout finished, and the device reports the release running.
rollout_done() {
    kill -0 "$AGENT_PID" 2>/dev/null || { echo "bench/agent-rss.sh: the agent exited" >&4; exit 1; }
    ctl --json rollout status "$1" | python3 -c 'import json,sys; sys.exit(json.load(sys.stdin)["status"]["state"] != "done")' &&
        ctl --json devices | python3 -c '
import json, sys
apps = json.load(sys.stdin)[0]["apps"]
sys.exit(not any(a["app"] == "demo" and (a.get("status") or {}).get("release") == sys.argv[1]
                 and a["status"]["state"] == "running" for a in apps))' "$2"
}
ROLLOUT1=$(ctl rollout start demo-1 --select site=lab --waves 100 --max-failures 1)
wait_for 180 "release demo-1 to be committed" rollout_done "$ROLLOUT1" demo-1
SUP1=$(supervisor_pid)
AGENT_START_HWM=$(kib "$AGENT_PID" VmHWM)

echo "== idle: sampling for ${IDLE_SECONDS}s"
sleep 5
MIN=999999999 MAX=0
for _ in $(seq "$IDLE_SECONDS"); do
    r=$(kib "$AGENT_PID" VmRSS)
    [ "$r" -lt "$MIN" ] && MIN=$r
    [ "$r" -gt "$MAX" ] && MAX=$r
    sleep 1
done
IDLE_RSS=$(kib "$AGENT_PID" VmRSS)
IDLE_HWM=$(kib "$AGENT_PID" VmHWM)
SUP1_RSS=$(kib "$SUP1" VmRSS)
SUP1_HWM=$(kib "$SUP1" VmHWM)
IDLE_PARTS=$(breakdown "$AGENT_PID")
SUP1_PARTS=$(breakdown "$SUP1")

echo "== update to demo-2 (peak reset first)"
echo 5 >"/proc/$AGENT_PID/clear_refs"
ctl release create demo "$REGISTRY/demo:v2" >/dev/null
ROLLOUT2=$(ctl rollout start demo-2 --select site=lab --waves 100 --max-failures 1)
PEAK_SAMPLED=0
sample_until_done() {
    local r
    r=$(kib "$AGENT_PID" VmRSS)
    [ "$r" -gt "$PEAK_SAMPLED" ] && PEAK_SAMPLED=$r
    rollout_done "$ROLLOUT2" demo-2
}
for _ in $(seq 360); do
    sample_until_done >/dev/null 2>&1 && break
    sleep 0.5
done
sample_until_done >/dev/null 2>&1 || { echo "bench/agent-rss.sh: demo-2 was not committed in 180s" >&2; exit 1; }
UPDATE_HWM=$(kib "$AGENT_PID" VmHWM)
AFTER_RSS=$(kib "$AGENT_PID" VmRSS)
SUP2=$(supervisor_pid)
SUP2_RSS=$(kib "$SUP2" VmRSS)
SUP2_HWM=$(kib "$SUP2" VmHWM)
AFTER_PARTS=$(breakdown "$AGENT_PID")

verdict() { if [ "$1" -le $(($2 * 1024)) ]; then echo "MET (<= $2 MiB)"; else echo "NOT MET (> $2 MiB)"; fi; }
echo
echo "== results (flotilla $(cd "$ROOT" && git rev-parse --short HEAD), $(uname -m), $(nproc) cores; $FLOTILLA, $(stat -c %s "$FLOTILLA") bytes$([ "${COLD:-0}" = 1 ] && echo ", cold page cache"))"
echo "agent idle VmRSS          $(mib "$IDLE_RSS") (min $(mib "$MIN"), max $(mib "$MAX") over ${IDLE_SECONDS}s)"
echo "   idle breakdown         $IDLE_PARTS"
echo "agent VmHWM at idle       $(mib "$IDLE_HWM") (since start: enrollment and the first install; $(mib "$AGENT_START_HWM") when demo-1 was committed)"
echo "agent update peak VmHWM   $(mib "$UPDATE_HWM") (highest VmRSS sampled every 0.5s: $(mib "$PEAK_SAMPLED"); VmRSS after: $(mib "$AFTER_RSS"))"
echo "   after the update       $AFTER_PARTS"
echo "supervisor demo-1         VmRSS $(mib "$SUP1_RSS"), VmHWM $(mib "$SUP1_HWM") (pid $SUP1)"
echo "   breakdown              $SUP1_PARTS"
echo "supervisor demo-2         VmRSS $(mib "$SUP2_RSS"), VmHWM $(mib "$SUP2_HWM") (pid $SUP2)"
echo "TARGET agent idle <= 8 MiB:    $(verdict "$IDLE_RSS" 8)"
echo "TARGET agent peak <= 32 MiB:   $(verdict "$UPDATE_HWM" 32)"
