"""``vi-edge run --config edge.yaml`` | ``vi-edge check --config ...`` | ``vi-edge package --out DIR``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edge.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vi-edge", description="Visual-inspection edge agent")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the agent")
    run.add_argument("--config", required=True, type=Path)
    check = commands.add_parser("check", help="validate the config file and exit")
    check.add_argument("--config", required=True, type=Path)
    package = commands.add_parser(
        "package", help="write the systemd unit, Greengrass recipe and example config"
    )
    package.add_argument("--out", required=True, type=Path)
    package.add_argument("--version", default="1.0.0")
    args = parser.parse_args(argv)

    if args.command == "package":
        from edge.package import write_package

        for path in write_package(args.out, args.version):
            print(path)
        return 0
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"vi-edge: {exc}", file=sys.stderr)
        return 2
    if args.command == "check":
        print(f"{args.config}: ok")
        return 0
    from edge.agent import run as run_agent

    try:
        return run_agent(config)
    except ConfigError as exc:  # found while building the agent (e.g. no AWS region for the cloud)
        print(f"vi-edge: {args.config}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
