"""Container healthchecks: ``python -m bastion.probe HOST:PORT ...`` exits 0 when every
address accepts TCP connections, 1 otherwise (naming the ones that refuse).

Standard library only, on purpose: a healthcheck runs every few seconds in every
container, and on an emulated arm64 edge node (``docs/EDGE.md``) importing
``bastion.container`` (pydantic, Flower's config, the run-config checks) took more than
the healthcheck's 60 s timeout, while this module answers in about 3 s.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Sequence


def probe(addresses: Sequence[str], timeout: float = 2.0) -> list[str]:
    """The ``host:port`` addresses of ``addresses`` that refuse TCP connections."""
    down = []
    for address in addresses:
        host, _, port = address.rpartition(":")
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
                pass
        except (OSError, ValueError):
            down.append(address)
    return down


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status of the healthcheck for ``argv`` (``HOST:PORT ...``)."""
    addresses = list(sys.argv[1:] if argv is None else argv)
    if not addresses:
        print("usage: python -m bastion.probe HOST:PORT [HOST:PORT ...]", file=sys.stderr)
        return 2
    down = probe(addresses)
    if down:
        print(f"not accepting connections: {', '.join(down)}", file=sys.stderr)
    return 1 if down else 0


if __name__ == "__main__":
    sys.exit(main())
