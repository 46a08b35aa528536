"""The ``memflow`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import __version__


def _demo(_: argparse.Namespace) -> int:
    print(
        "memflow demo: not yet available. The end-to-end demo needs the Wan integration and the "
        "streaming pipeline, which are not part of this release yet; the memory engine "
        "(MemFlowConfig, StreamingSession) is, and `make test` exercises it."
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memflow", description="Long-term memory for streaming video diffusion models."
    )
    parser.add_argument("--version", action="version", version=f"memflow-adapter {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="run the end-to-end demo").set_defaults(handler=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
