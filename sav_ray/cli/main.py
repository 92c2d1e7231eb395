"""`sav-ray <command> [flags]`: every job under one command; `sav-ray <command> -h` for its flags."""

from __future__ import annotations

import importlib
import sys

import sav_ray.cli as cli
from sav_ray import __version__

# command -> what it does (static: `sav-ray -h` imports no job, so it answers at once)
COMMANDS = {
    "fit": "fit a SAV classifier on Ray, write its artifact, log and register it in MLflow",
    "predict": "classify a manifest with one or more artifacts on Ray Data",
    "evaluate": "evaluate an artifact against zero-shot and all-heads baselines, log to MLflow",
    "promote": "move a registered model's alias, gated on evaluation; or roll it back",
    "serve": "serve one artifact on this machine, classify a manifest over HTTP, stop",
    "demo": "the offline demo: tiny model, generated data, fit, evaluate, promote, serve",
    "benchmark": "speed and memory ratios, measured in one run (JSON and Markdown report)",
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        f"usage: {cli.COMMAND} <command> [flags]   ({cli.COMMAND} <command> -h: its flags)",
        "",
    ]
    lines += [f"  {name:<{width}}  {what}" for name, what in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0 if args else 2
    if args[0] == "--version":
        print(f"{cli.COMMAND} {__version__}")
        return 0
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"{usage()}\n\nerror: unknown command {command!r}", file=sys.stderr)
        return 2
    cli._invoked_as_command = True
    return importlib.import_module(f"sav_ray.cli.{command}").main(rest)


if __name__ == "__main__":
    sys.exit(main())
