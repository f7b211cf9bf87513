"""Runs schemathesis against a real flotilla-server, for tests/fuzz_api.rs.

Usage: run.py SERVER_BINARY WORK_DIR MAX_EXAMPLES

Meant to run in a private network namespace (`unshare --net`): the server and the fuzzer meet on its loopback,
and the releases the fuzzer asks for resolve against no registry at all instead of whatever its made-up image
names would reach on the Internet. Starts the server with a fresh database, makes an unlimited enrollment token
and enrolls one device for the device routes, then runs `schemathesis run docs/openapi.yaml` over every operation
with each security scheme's secret. Exits with schemathesis's status; 2 when the setup itself fails.
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def call(base, method, path, token, body):
    req = urllib.request.Request(
        base + path,
        method=method,
        data=json.dumps(body).encode(),
        headers={"Authorization": "Bearer " + token, "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)


def main():
    server, work, examples = sys.argv[1], sys.argv[2], sys.argv[3]
    # A fresh network namespace has its loopback down.
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    port = 8470
    base = f"http://127.0.0.1:{port}"
    log = open(os.path.join(work, "server.log"), "wb")
    child = subprocess.Popen(
        [server, "serve", "--listen", f"127.0.0.1:{port}", "--db", os.path.join(work, "server.db"), "--tick", "1s",
         # The fuzzer's few credentials send thousands of requests: at the default rate most would get 429 (which the
         # document allows) and the server's logic would go untested.
         "--rate-limit", "100000", "--rate-burst", "100000"],
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or child.poll() is not None:
                    print("fuzz: the server did not start; see server.log", file=sys.stderr)
                    return 2
                time.sleep(0.1)
        admin = open(os.path.join(work, "admin-token")).read().strip()
        # Unlimited and never expiring: every enrollment the fuzzer makes may succeed.
        token = call(base, "POST", "/v1/tokens", admin, {"uses": None, "expires_in": None})["token"]
        device = call(
            base,
            "POST",
            "/v1/enroll",
            token,
            {
                "name": "fuzz-device-credential-holder",
                "agent_version": "0.1.0",
                "platform": {"candidates": ["linux/amd64"], "page_size": 4096, "description": "fuzz"},
            },
        )["credential"]
        env = dict(os.environ, FUZZ_ADMIN=admin, FUZZ_TOKEN=token, FUZZ_DEVICE=device)
        config = os.path.join(work, "schemathesis.toml")
        with open(config, "w") as f:
            f.write(
                "[auth.openapi.adminToken]\nbearer = \"${FUZZ_ADMIN}\"\n"
                "[auth.openapi.enrollmentToken]\nbearer = \"${FUZZ_TOKEN}\"\n"
                "[auth.openapi.deviceCredential]\nbearer = \"${FUZZ_DEVICE}\"\n"
            )
        st = os.path.join(os.path.dirname(sys.executable), "schemathesis")
        cmd = [
            st, "--config-file", config, "run", os.path.join(ROOT, "docs", "openapi.yaml"),
            "--url", base,
            "--checks", "all",
            "--max-examples", examples,
            "--seed", os.environ.get("FLOTILLA_FUZZ_SEED", "1"),
            "--generation-database", "none",
            "--request-timeout", "70",
            "--report", "junit",
            "--report-dir", os.path.join(work, "report"),
            "--no-color",
        ] + sys.argv[4:]
        return subprocess.run(cmd, env=env).returncode
    finally:
        child.terminate()
        child.wait()


if __name__ == "__main__":
    sys.exit(main())
