"""The ``horizon`` command: one module per subcommand, registered here."""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import PackageNotFoundError, version

from horizon.cli import checkpoint, estimate, plan, profile, train

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
    for name, module, summary in (("train", train, "train the reference decoder on byte-level text"),
                                  ("estimate", estimate, "host, pinned, device and SSD bytes a run needs"),
                                  ("profile", profile, "measure per-unit costs for the planner, save JSON"),
                                  ("plan", plan, "choose the activation plan for a budget from a profile"),
                                  ("checkpoint", checkpoint, "list, verify or export checkpoints")):
        sub = commands.add_parser(name, help=summary, description=(module.__doc__ or "").split("\n\n")[0],
                                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(check=module.check_arguments, run=module.run)
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
