"""An mDNS responder for tests/mdns.rs: python-zeroconf answering NAME.local -> ADDRESS on loopback only.

Usage: responder.py NAME.local ADDRESS. It prints "ready" once the name is registered (after zeroconf's probe),
and exits when its standard input closes, so it never outlives the test that started it.
"""

import socket
import sys

from zeroconf import IPVersion, ServiceInfo, Zeroconf


def main() -> None:
    host, address = sys.argv[1], sys.argv[2]
    server = host if host.endswith(".") else host + "."
    # Only the loopback interface: the test routes 224.0.0.0/4 to lo, and nothing may reach a real network.
    zc = Zeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
    # zeroconf answers for a host name as part of a service; the service itself is never asked for.
    info = ServiceInfo(
        "_flotilla-test._tcp.local.",
        "flotilla-test._flotilla-test._tcp.local.",
        addresses=[socket.inet_aton(address)],
        port=1,
        server=server,
    )
    zc.register_service(info)
    print("ready", flush=True)
    try:
        sys.stdin.read()
    finally:
        zc.unregister_service(info)
        zc.close()


if __name__ == "__main__":
    main()
