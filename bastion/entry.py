"""The ``bastion`` console script: dispatch ``bastion supernode`` before importing the rest.

``bastion supernode`` supervises a SuperNode on every machine of a federation, edge
devices included (:mod:`bastion.supernode`); it needs the standard library only, so it
must not pay for :mod:`bastion.cli`'s imports (torch, the app's packages) in a process
that stays up as long as the SuperNode.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``bastion ARGS``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["supernode"]:
        from bastion.supernode import main as supernode_main

        return supernode_main(args[1:])
    from bastion.cli import main as cli_main

    return cli_main(args)


if __name__ == "__main__":
    sys.exit(main())
