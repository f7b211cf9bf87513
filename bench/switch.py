#!/usr/bin/env python3
"""Switch benchmark: from `flotilla stop` of one version to the next version's process running, both unpacked.

Builds an OCI layout with two versions (v1, v2) of a busybox-static app that exits at once on SIGTERM, pulls and
unpacks both with `flotilla pull --unpack`, starts v1, then switches back and forth: `flotilla stop OLD` followed
by `flotilla run --detach NEW` (which returns once the new container's process runs). The peer, in the same run,
is runc alone on a ready bundle: `runc kill OLD TERM`, wait, `runc delete OLD`, `runc run --detach NEW`. That is
the floor any runc-based agent pays. Reports medians and the flotilla/runc ratio. Needs root.

Usage: sudo bench/switch.py [--flotilla target/release/flotilla] [--rounds 10]
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pull as bench  # noqa: E402  (the layout writer shared with the pull benchmark)

APP = "trap 'exit 0' TERM; while :; do busybox sleep 0.05; done"


def build(path, busybox):
    layout = bench.Layout(path)
    with open(busybox, "rb") as f:
        bb = f.read()
    descs = []
    for version in ["v1", "v2"]:
        tar = bench.tar_of([("bin/busybox", bb, 0o755), ("etc/version", version.encode(), 0o644)])
        layer, diff_id = bench.layer(layout, tar)
        config = {"os": "linux", "architecture": "amd64",
                  "config": {"Entrypoint": ["/bin/busybox", "sh"], "Env": ["PATH=/bin"]},
                  "rootfs": {"type": "layers", "diff_ids": [diff_id]}}
        cfg = layout.json_blob(config, "application/vnd.oci.image.config.v1+json")
        manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "config": cfg, "layers": [layer]}
        desc = layout.json_blob(manifest, "application/vnd.oci.image.manifest.v1+json")
        desc["annotations"] = {"org.opencontainers.image.ref.name": version}
        descs.append(desc)
    with open(os.path.join(path, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": descs}, f)


def run(cmd, quiet=False):
    # A detached container inherits runc's stdio: capturing it would wait for the container to end.
    if quiet:
        out = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if out.returncode != 0:
            sys.exit(f"bench: {' '.join(cmd)} failed ({out.returncode})")
        return ""
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"bench: {' '.join(cmd)} failed ({out.returncode}):\n{out.stdout}{out.stderr}")
    return out.stdout


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flotilla", default=os.path.join(root, "target", "release", "flotilla"))
    ap.add_argument("--busybox", default=os.path.join(root, "target", "test-fixtures", "busybox", "amd64", "busybox"))
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench: needs root (runc)")
    for tool in ["runc"]:
        if not shutil.which(tool):
            sys.exit(f"bench: {tool} is not installed (run tests/setup)")
    work = tempfile.mkdtemp(prefix="flotilla-switch-")
    state = os.path.join(work, "state")
    f = [args.flotilla, "--state-dir", state]
    current = None
    try:
        build(os.path.join(work, "layout"), args.busybox)
        src = lambda v: f"oci:{work}/layout:{v}"  # noqa: E731
        for v in ["v1", "v2"]:
            run(f + ["pull", "--unpack", src(v)])
        run(f + ["run", "--detach", "--name", "app-0", src("v1"), "--", "-c", APP])

        flotilla = []
        current = "app-0"
        for r in range(1, args.rounds + 1):
            new = f"app-{r}"
            version = "v2" if r % 2 else "v1"
            start = time.monotonic()
            run(f + ["stop", current])
            run(f + ["run", "--detach", "--name", new, src(version), "--", "-c", APP])
            flotilla.append(time.monotonic() - start)
            run(f + ["rm", current])
            current = new

        # The peer: runc alone, on bundles made ahead of time (copies of flotilla's, each with its own root).
        bundle = os.path.join(state, "containers", current, "bundle", "config.json")
        with open(bundle) as fh:
            spec = json.load(fh)
        runc_root = os.path.join(work, "runc-root")
        bundles = []
        for i in range(2):
            b = os.path.join(work, f"peer-{i}")
            os.makedirs(b)
            s = json.loads(json.dumps(spec))
            s["linux"]["cgroupsPath"] = f"/flotilla-bench-peer-{i}"
            with open(os.path.join(b, "config.json"), "w") as fh:
                json.dump(s, fh)
            bundles.append(b)
        runc = ["runc", "--root", runc_root]
        peer = []
        run(runc + ["run", "--detach", "--bundle", bundles[0], "peer-0"], quiet=True)
        old = 0
        for r in range(1, args.rounds + 1):
            new = r % 2
            start = time.monotonic()
            run(runc + ["kill", f"peer-{old}", "TERM"])
            for _ in range(1000):
                st = json.loads(run(runc + ["state", f"peer-{old}"]))
                if st["status"] == "stopped":
                    break
                time.sleep(0.005)
            run(runc + ["delete", f"peer-{old}"])
            run(runc + ["run", "--detach", "--bundle", bundles[new], f"peer-{new}"], quiet=True)
            peer.append(time.monotonic() - start)
            old = new
        run(runc + ["delete", "--force", f"peer-{old}"])

        fm, pm = statistics.median(flotilla), statistics.median(peer)
        print(f"switch, median of {args.rounds}: flotilla stop+run {fm * 1000:.0f} ms "
              f"(min {min(flotilla) * 1000:.0f}, max {max(flotilla) * 1000:.0f}); "
              f"runc kill+delete+run {pm * 1000:.0f} ms; ratio {fm / pm:.2f}x")
    finally:
        if current:
            subprocess.run(f + ["rm", "--force", current], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
