#!/usr/bin/env python3
"""Pull benchmark: `flotilla pull` against `skopeo copy docker://… oci:…`, same image, same loopback registry, same run.

Builds a multi-arch OCI image whose linux/amd64 variant carries ~300 MB of gzip layers (random data, so the bytes
cannot be skipped by compression tricks) plus a busybox top layer as the entrypoint, pushes it to Debian's
docker-registry on 127.0.0.1, then alternates the two pullers into fresh directories and reports wall time, CPU
time (user+sys of the child) and peak RSS, with flotilla/skopeo ratios of the medians.

Usage: bench/pull.py [--flotilla target/release/flotilla] [--rounds 3] [--layer-mb 50] [--layers 6]
"""
import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Layout:
    """A minimal OCI image layout writer."""

    def __init__(self, path):
        self.path = path
        os.makedirs(os.path.join(path, "blobs", "sha256"), exist_ok=True)
        with open(os.path.join(path, "oci-layout"), "w") as f:
            json.dump({"imageLayoutVersion": "1.0.0"}, f)

    def blob(self, data, media_type):
        digest = hashlib.sha256(data).hexdigest()
        with open(os.path.join(self.path, "blobs", "sha256", digest), "wb") as f:
            f.write(data)
        return {"mediaType": media_type, "digest": "sha256:" + digest, "size": len(data)}

    def json_blob(self, obj, media_type):
        return self.blob(json.dumps(obj, separators=(",", ":")).encode(), media_type)


def tar_of(files):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, data, mode in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = mode
            info.mtime = 0
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def layer(layout, tar_bytes):
    gz = gzip.compress(tar_bytes, compresslevel=1, mtime=0)
    desc = layout.blob(gz, "application/vnd.oci.image.layer.v1.tar+gzip")
    return desc, "sha256:" + hashlib.sha256(tar_bytes).hexdigest()


def image(layout, arch, variant, busybox, big_layers):
    layers, diff_ids = [], []
    for tar_bytes in big_layers:
        d, diff = layer(layout, tar_bytes)
        layers.append(d)
        diff_ids.append(diff)
    with open(busybox, "rb") as f:
        bb = f.read()
    d, diff = layer(layout, tar_of([("bin/busybox", bb, 0o755)]))
    layers.append(d)
    diff_ids.append(diff)
    platform = {"os": "linux", "architecture": arch}
    if variant:
        platform["variant"] = variant
    config = dict(platform)
    config.update({
        "config": {"Entrypoint": ["/bin/busybox"], "Cmd": ["true"], "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    })
    cfg = layout.json_blob(config, "application/vnd.oci.image.config.v1+json")
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": cfg, "layers": layers}
    desc = layout.json_blob(manifest, "application/vnd.oci.image.manifest.v1+json")
    desc["platform"] = platform
    return desc


def build_image(path, busybox_dir, layer_mb, n_layers):
    layout = Layout(path)
    big = [tar_of([(f"data/blob{i}", os.urandom(layer_mb << 20), 0o644)]) for i in range(n_layers)]
    manifests = [image(layout, "amd64", None, os.path.join(busybox_dir, "amd64", "busybox"), big)]
    for arch, variant, dirname in [("arm64", "v8", "arm64"), ("arm", "v7", "armhf"), ("arm", "v5", "armel")]:
        manifests.append(image(layout, arch, variant, os.path.join(busybox_dir, dirname, "busybox"), []))
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": manifests}
    desc = layout.json_blob(index, "application/vnd.oci.image.index.v1+json")
    desc["annotations"] = {"org.opencontainers.image.ref.name": "bench"}
    with open(os.path.join(path, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [desc]}, f)


def start_registry(workdir, port):
    storage = os.path.join(workdir, "registry")
    cfg = os.path.join(workdir, "registry.yml")
    with open(cfg, "w") as f:
        f.write(f"version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {storage}\n"
                f"http:\n  addr: 127.0.0.1:{port}\n")
    proc = subprocess.Popen(["docker-registry", "serve", cfg], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1)
            return proc
        except Exception:
            time.sleep(0.1)
    proc.kill()
    sys.exit("bench: docker-registry did not start")


def measure(cmd):
    """Wall and CPU time of `cmd`, and its peak RSS as GNU time reports it.

    Peak RSS cannot come from this process's wait4: a child forked from Python starts with Python's resident
    memory counted in its high-water mark, and keeps it across exec. GNU time is small, so the process it forks
    starts clean."""
    report = tempfile.NamedTemporaryFile(prefix="flotilla-bench-time-", delete=False)
    report.close()
    start = time.monotonic()
    proc = subprocess.Popen(["/usr/bin/time", "-o", report.name, "-f", "%M %U %S", *cmd],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = proc.communicate()[1].decode(errors="replace")
    wall = time.monotonic() - start
    with open(report.name) as f:
        lines = f.read().split("\n")
    os.unlink(report.name)
    if proc.returncode != 0:
        sys.exit(f"bench: {' '.join(cmd)} failed:\n{err}\n{' '.join(lines)}")
    rss_kib, user, system = lines[-2].split() if lines[-1] == "" else lines[-1].split()
    return {"wall": wall, "cpu": float(user) + float(system), "rss_mib": int(rss_kib) / 1024}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flotilla", default=os.path.join(ROOT, "target", "release", "flotilla"))
    ap.add_argument("--busybox-dir", default=os.environ.get(
        "FLOTILLA_BUSYBOX_DIR", os.path.join(ROOT, "target", "test-fixtures", "busybox")))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--layer-mb", type=int, default=50)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--build-only", metavar="DIR", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build_only:
        build_image(args.build_only, args.busybox_dir, args.layer_mb, args.layers)
        return
    for tool in ["docker-registry", "skopeo", "/usr/bin/time"]:
        if not shutil.which(tool):
            sys.exit(f"bench: {tool} is not installed (run tests/setup)")
    if not os.access(args.flotilla, os.X_OK):
        sys.exit(f"bench: {args.flotilla} is missing: cargo build --release")

    work = tempfile.mkdtemp(prefix="flotilla-bench-")
    port = free_port()
    registry = start_registry(work, port)
    try:
        src = os.path.join(work, "src")
        print(f"bench: building image ({args.layers} x {args.layer_mb} MiB random layers)...", flush=True)
        # In a child process: the pullers are forked from this one, and a child's peak RSS counts the memory it
        # was forked with, so this process must never hold the image's bytes.
        subprocess.run([sys.executable, os.path.abspath(__file__), "--build-only", src, "--busybox-dir",
                        args.busybox_dir, "--layer-mb", str(args.layer_mb), "--layers", str(args.layers)],
                       check=True)
        ref = f"127.0.0.1:{port}/bench:latest"
        subprocess.run(["skopeo", "copy", "--all", "--quiet", "--dest-tls-verify=false", f"oci:{src}:bench",
                        f"docker://{ref}"], check=True)
        gz_bytes = sum(os.path.getsize(os.path.join(src, "blobs", "sha256", b))
                       for b in os.listdir(os.path.join(src, "blobs", "sha256")))
        print(f"bench: pushed {ref} ({gz_bytes / 1e6:.0f} MB of blobs in the layout)", flush=True)

        results = {"flotilla": [], "skopeo": []}
        for r in range(args.rounds):
            for name in (["flotilla", "skopeo"] if r % 2 == 0 else ["skopeo", "flotilla"]):
                dest = os.path.join(work, f"{name}-{r}")
                if name == "flotilla":
                    cmd = [args.flotilla, "--state-dir", dest, "--insecure-registry", f"127.0.0.1:{port}",
                           "--platform", "linux/amd64", "pull", ref]
                else:
                    cmd = ["skopeo", "copy", "--quiet", "--src-tls-verify=false", f"docker://{ref}",
                           f"oci:{dest}:bench"]
                m = measure(cmd)
                results[name].append(m)
                print(f"  round {r + 1} {name:8} wall {m['wall']:6.2f} s  cpu {m['cpu']:6.2f} s  "
                      f"peak RSS {m['rss_mib']:6.1f} MiB", flush=True)
                shutil.rmtree(dest, ignore_errors=True)

        med = {n: {k: statistics.median(x[k] for x in v) for k in ("wall", "cpu", "rss_mib")}
               for n, v in results.items()}
        print("\nmedians        wall (s)   cpu (s)   peak RSS (MiB)")
        for n in ("flotilla", "skopeo"):
            print(f"  {n:10} {med[n]['wall']:9.2f} {med[n]['cpu']:9.2f} {med[n]['rss_mib']:12.1f}")
        print(f"ratio flotilla/skopeo: wall {med['flotilla']['wall'] / med['skopeo']['wall']:.2f}x, "
              f"cpu {med['flotilla']['cpu'] / med['skopeo']['cpu']:.2f}x, "
              f"peak RSS {med['flotilla']['rss_mib'] / med['skopeo']['rss_mib']:.2f}x")
    finally:
        registry.kill()
        registry.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
