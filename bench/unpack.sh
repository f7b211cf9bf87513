#!/bin/bash
# Unpack benchmark: `flotilla pull --unpack` against `skopeo copy` + `umoci unpack` of the same image, from the same
# loopback registry, in one run.
#
# The image (linux/amd64, ~450 MB of gzip layers, ~1.2 GB unpacked) runs a dynamically linked binary (the host's
# /bin/true) whose loader and libc (the host's Debian libc6 files) sit in the largest layer, so the architecture
# proof has to reach the base layer. The bulk is text of realistic entropy (gzip ratio ~2.7), spread over large
# and small files. Each tool runs under /usr/bin/time -v; the script prints wall time, CPU (user+sys), peak RSS,
# and flotilla's ratios to the skopeo+umoci pair. Targets: <= 0.5x wall and CPU, peak RSS <= 32 MiB.
#
# Usage: bench/unpack.sh [WORKDIR]   (default: a temporary directory, removed afterwards)
# Needs: docker-registry, skopeo, umoci, /usr/bin/time, python3, gzip; a release build (made here if missing).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
FLOTILLA=${FLOTILLA:-$ROOT/target/release/flotilla}
WORK=${1:-}
if [ -z "$WORK" ]; then
    WORK=$(mktemp -d)
    trap 'kill "${REGISTRY_PID:-}" 2>/dev/null || true; rm -rf "$WORK"' EXIT
else
    mkdir -p "$WORK"
    trap 'kill "${REGISTRY_PID:-}" 2>/dev/null || true' EXIT
fi
for tool in docker-registry skopeo umoci /usr/bin/time python3 gzip; do
    command -v "$tool" >/dev/null || { echo "bench/unpack.sh: $tool is missing" >&2; exit 1; }
done
if [ ! -x "$FLOTILLA" ]; then
    (cd "$ROOT" && cargo build --release --bin flotilla)
fi

echo "== building the image in $WORK/layout"
python3 - "$WORK" <<'EOF'
import hashlib, io, json, os, random, shutil, subprocess, sys, tarfile, zlib

work = sys.argv[1]
layout = os.path.join(work, "layout")
blobs = os.path.join(layout, "blobs", "sha256")
os.makedirs(blobs, exist_ok=True)
random.seed(2718)
letters = "abcdefghijklmnopqrstuvwxyz"
# A vocabulary of this size gives zlib -6 a ratio near 2.7 on the text below.
vocab = ["".join(random.choice(letters) for _ in range(random.randint(2, 12))) for _ in range(2500)]
chunks = []
for _ in range(8):
    out = bytearray()
    while len(out) < (1 << 20) + 65536:
        out += (" ".join(random.choices(vocab, k=40)) + "\n").encode()
    chunks.append(bytes(out))
sample = chunks[0][: 1 << 20]
print(f"   text gzip ratio (zlib -6): {len(sample) / len(zlib.compress(sample, 6)):.2f}")

def data(n, seed):
    # Distinct bytes per file at no cost: a chunk at an offset (gzip's 32 KiB window sees no repetition).
    c = chunks[seed % len(chunks)]
    off = (seed * 7919) % 65536
    return (c[off:] * (n // (len(c) - off) + 1))[:n]

def add(tar, path, payload, mode=0o644):
    info = tarfile.TarInfo(path)
    info.size = len(payload)
    info.mode = mode
    info.mtime = 1_700_000_000
    tar.addfile(info, io.BytesIO(payload))

def add_dir(tar, path):
    info = tarfile.TarInfo(path)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    info.mtime = 1_700_000_000
    tar.addfile(info)

def layer(name, fill):
    raw = os.path.join(work, name + ".tar")
    with tarfile.open(raw, "w", format=tarfile.PAX_FORMAT) as tar:
        fill(tar)
    h = hashlib.sha256()
    with open(raw, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    diff_id = "sha256:" + h.hexdigest()
    gz = raw + ".gz"
    with open(gz, "wb") as out:
        subprocess.run(["gzip", "-6", "-c", raw], stdout=out, check=True)
    h = hashlib.sha256()
    with open(gz, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    digest = h.hexdigest()
    size = os.path.getsize(gz)
    shutil.move(gz, os.path.join(blobs, digest))
    unpacked = os.path.getsize(raw)
    os.remove(raw)
    print(f"   {name}: {unpacked / 1e6:.0f} MB tar, {size / 1e6:.0f} MB gzip")
    return {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": "sha256:" + digest, "size": size}, diff_id

def base(tar):
    for d in ["lib", "lib/x86_64-linux-gnu", "lib64", "usr", "usr/share", "usr/share/bulk", "usr/share/small"]:
        add_dir(tar, d)
    # The loader and libc the entrypoint needs, Debian's libc6 files from this host.
    for src, dst in [("/lib64/ld-linux-x86-64.so.2", "lib64/ld-linux-x86-64.so.2"),
                     ("/lib/x86_64-linux-gnu/libc.so.6", "lib/x86_64-linux-gnu/libc.so.6")]:
        with open(os.path.realpath(src), "rb") as f:
            add(tar, dst, f.read(), 0o755)
    for i in range(700):
        add(tar, f"usr/share/bulk/b{i:04}", data(1 << 20, i))
    for i in range(12000):
        add(tar, f"usr/share/small/s{i:05}", data(16 << 10, 1000 + i))

def middle(tar):
    add_dir(tar, "opt")
    for i in range(250):
        add(tar, f"opt/m{i:04}", data(1 << 20, 20000 + i))

def top(tar):
    add_dir(tar, "bin")
    with open("/bin/true", "rb") as f:
        add(tar, "bin/app", f.read(), 0o755)

layers, diff_ids = [], []
for name, fill in [("base", base), ("middle", middle), ("top", top)]:
    desc, diff_id = layer(name, fill)
    layers.append(desc)
    diff_ids.append(diff_id)

def put(obj):
    b = json.dumps(obj).encode()
    d = hashlib.sha256(b).hexdigest()
    with open(os.path.join(blobs, d), "wb") as f:
        f.write(b)
    return {"digest": "sha256:" + d, "size": len(b)}

config = put({"architecture": "amd64", "os": "linux",
              "config": {"Entrypoint": ["/bin/app"], "Env": ["PATH=/bin"]},
              "rootfs": {"type": "layers", "diff_ids": diff_ids}})
manifest = put({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": dict(config, mediaType="application/vnd.oci.image.config.v1+json"),
                "layers": layers})
with open(os.path.join(layout, "oci-layout"), "w") as f:
    f.write('{"imageLayoutVersion":"1.0.0"}')
with open(os.path.join(layout, "index.json"), "w") as f:
    json.dump({"schemaVersion": 2, "manifests": [dict(manifest, mediaType="application/vnd.oci.image.manifest.v1+json",
               annotations={"org.opencontainers.image.ref.name": "v1"})]}, f)
EOF

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat >"$WORK/registry.yml" <<EOF
version: 0.1
log:
  level: error
storage:
  filesystem:
    rootdirectory: $WORK/registry
http:
  addr: 127.0.0.1:$PORT
EOF
docker-registry serve "$WORK/registry.yml" >"$WORK/registry.log" 2>&1 &
REGISTRY_PID=$!
for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
    sleep 0.1
done
echo '{"default":[{"type":"insecureAcceptAnything"}]}' >"$WORK/policy.json"
IMAGE=127.0.0.1:$PORT/bench:v1
echo "== pushing to $IMAGE"
skopeo --policy "$WORK/policy.json" copy --dest-tls-verify=false "oci:$WORK/layout:v1" "docker://$IMAGE" >/dev/null

# Runs a command under /usr/bin/time -v; prints "wall cpu rss_kib".
measure() {
    local out=$1
    shift
    /usr/bin/time -v -o "$out" "$@" >/dev/null 2>"$out.stderr" || { cat "$out.stderr" >&2; exit 1; }
    python3 - "$out" <<'EOF'
import re, sys
t = open(sys.argv[1]).read()
wall = t.split("Elapsed (wall clock) time (h:mm:ss or m:ss): ")[1].split("\n")[0].split(":")
secs = sum(float(x) * 60 ** i for i, x in enumerate(reversed(wall)))
user = float(re.search(r"User time \(seconds\): ([\d.]+)", t).group(1))
system = float(re.search(r"System time \(seconds\): ([\d.]+)", t).group(1))
rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", t).group(1))
print(f"{secs:.2f} {user + system:.2f} {rss}")
EOF
}

sync
echo "== flotilla pull --unpack"
: >"$WORK/empty.toml"
read -r F_WALL F_CPU F_RSS < <(measure "$WORK/time.flotilla" "$FLOTILLA" --config "$WORK/empty.toml" \
    --state-dir "$WORK/flotilla" --insecure-registry "127.0.0.1:$PORT" --platform linux/amd64 pull --unpack "$IMAGE")
sync
echo "== skopeo copy + umoci unpack"
read -r S_WALL S_CPU S_RSS < <(measure "$WORK/time.skopeo" skopeo --policy "$WORK/policy.json" copy \
    --src-tls-verify=false "docker://$IMAGE" "oci:$WORK/skopeo:v1")
read -r U_WALL U_CPU U_RSS < <(measure "$WORK/time.umoci" umoci unpack --image "$WORK/skopeo:v1" "$WORK/bundle")

python3 - "$F_WALL" "$F_CPU" "$F_RSS" "$S_WALL" "$S_CPU" "$S_RSS" "$U_WALL" "$U_CPU" "$U_RSS" <<'EOF'
import sys
fw, fc, fr, sw, sc, sr, uw, uc, ur = map(float, sys.argv[1:])
ow, oc, orss = sw + uw, sc + uc, max(sr, ur)
print(f"{'':24}{'wall s':>10}{'cpu s':>10}{'peak RSS MiB':>14}")
print(f"{'flotilla pull --unpack':24}{fw:10.2f}{fc:10.2f}{fr / 1024:14.1f}")
print(f"{'skopeo copy':24}{sw:10.2f}{sc:10.2f}{sr / 1024:14.1f}")
print(f"{'umoci unpack':24}{uw:10.2f}{uc:10.2f}{ur / 1024:14.1f}")
print(f"{'skopeo + umoci':24}{ow:10.2f}{oc:10.2f}{orss / 1024:14.1f}")
print(f"ratios flotilla / (skopeo + umoci): wall {fw / ow:.2f}x (target <= 0.5), cpu {fc / oc:.2f}x (target <= 0.5); "
      f"flotilla peak RSS {fr / 1024:.1f} MiB (target <= 32)")
EOF
