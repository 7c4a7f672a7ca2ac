"""The ``horizon`` command: one module per subcommand, registered here."""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import PackageNotFoundError, version

from horizon.cli import checkpoint, train

__all__ = ["main", "build_parser"]


def _version() -> str:
    try:
        return version("horizon")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="horizon", description="Train models larger than GPU memory.")
    parser.add_argument("--version", action="version", version=f"horizon {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    train_parser = commands.add_parser(
        "train", help="train the reference decoder on byte-level text",
        description=(train.__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    train.add_arguments(train_parser)
    train_parser.set_defaults(check=train.check_arguments, run=train.run)
    ckpt_parser = commands.add_parser("checkpoint", help="list, verify or export checkpoints",
                                      description=(checkpoint.__doc__ or "").split("\n\n")[0])
    checkpoint.add_arguments(ckpt_parser)
    ckpt_parser.set_defaults(check=checkpoint.check_arguments, run=checkpoint.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.check(parser, args)
    try:
        return args.run(args)
    except ValueError as e:  # a user error (bad text file, model, config): say it without a traceback
        print(f"horizon {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
