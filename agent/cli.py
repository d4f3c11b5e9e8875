"""The ``spotguard`` command.

Exit codes: 0 ok, 1 the command ran but what it checks failed (``status`` could not get a usable
answer), 2 a usage or configuration error, reported as one line that names the culprit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from spotguard.agent.config import AgentConfig, load_config
from spotguard.agent.errors import ConfigError, ImdsError
from spotguard.agent.imds import ImdsClient
from spotguard.agent.logs import configure_logging
from spotguard.agent.protocol import format_time
from spotguard.agent.watches import watches_from_config

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are exit 2 with a single line (no usage dump to wade through)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML file (default /etc/spotguard/agent.toml)")
    parser.add_argument("--imds-endpoint", help="IMDS base URL (default http://169.254.169.254)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="spotguard", description="Keep spot GPU training alive.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    agent = commands.add_parser("agent", help="run the on-node daemon")
    _config_flags(agent)
    agent.add_argument("--state-dir", help="shared with the trainer hooks (default /run/spotguard)")
    agent.add_argument("--poll-interval", type=float, help="seconds between polls (default 1)")

    status = commands.add_parser("status", help="poll IMDS once and print what it says now")
    _config_flags(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")

    ckpt = commands.add_parser("ckpt", help="inspect and manage a checkpoint store")
    ckpt_commands = ckpt.add_subparsers(dest="ckpt_command", required=True, parser_class=_Parser)
    listing = ckpt_commands.add_parser("list", help="committed checkpoints, oldest first")
    listing.add_argument("uri", help="local path, file:///path or s3://bucket/prefix")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    verify = ckpt_commands.add_parser("verify", help="re-read every byte against the manifests")
    verify.add_argument("uri")
    verify.add_argument("--step", type=int, help="only this checkpoint")
    prune = ckpt_commands.add_parser("prune", help="delete all but the newest checkpoints")
    prune.add_argument("uri")
    prune.add_argument("--keep-last", type=int, required=True)
    pull = ckpt_commands.add_parser("pull", help="download a verified checkpoint")
    pull.add_argument("uri")
    pull.add_argument("dest", help="local directory")
    pull.add_argument("--step", type=int, help="default: the newest")

    drill = commands.add_parser(
        "drill", help="rehearse an interruption end to end on this machine (or size a save)"
    )
    drill.add_argument("--store", help="checkpoint store URI (default: a temporary directory)")
    drill.add_argument("--ranks", type=int, default=1, help="DDP ranks on gloo (default 1)")
    drill.add_argument("--interruptions", type=int, default=1, help="interruptions in one run")
    drill.add_argument("--seed", type=int, help="picks the interruption steps (default random)")
    drill.add_argument("--script", type=Path, help="your training script instead of the built-in")
    drill.add_argument("--json", action="store_true", help="print the report as JSON")
    drill.add_argument("--report", type=Path, metavar="FILE.html", help="write an HTML timeline")
    drill.add_argument(
        "--budget",
        action="store_true",
        help="instead: does an emergency save of --state-size fit in the 2-minute notice?",
    )
    drill.add_argument(
        "--state-size",
        help="e.g. 1GiB: extra state in the built-in workload; with --budget, the size to judge "
        "(default: the newest checkpoint's)",
    )
    drill.add_argument("--probe-size", default="256MiB", help="with --budget: bytes to time")
    drill.add_argument(
        "--step-seconds",
        type=float,
        default=2.0,
        help="with --budget: the longest training step (the save starts after it)",
    )

    fleet = commands.add_parser("fleet", help="provisioning helpers for the Terraform module")
    fleet_commands = fleet.add_subparsers(dest="fleet_command", required=True, parser_class=_Parser)
    render = fleet_commands.add_parser(
        "render", help="model/infrastructure YAML -> Terraform variables JSON"
    )
    render.add_argument("config", type=Path, help="model_config.yaml")
    render.add_argument("--out", type=Path, help="write here (default: standard output)")

    units = commands.add_parser(
        "install-units", help="copy the shipped systemd unit files (prints what changed)"
    )
    units.add_argument("--dest", type=Path, default=Path("/etc/systemd/system"))

    sim = commands.add_parser("imds-sim", help="run the local IMDS simulator")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=1338, help="0 picks a free port")
    return parser


def _load(args: argparse.Namespace, environ: dict[str, str]) -> AgentConfig:
    overrides = {
        "imds_endpoint": args.imds_endpoint,
        "state_dir": getattr(args, "state_dir", None),
        "poll_interval": getattr(args, "poll_interval", None),
    }
    return load_config(args.config, environ=environ, overrides=overrides)


def _run_agent(config: AgentConfig) -> int:
    from spotguard.agent.daemon import Agent

    configure_logging(config.log_format, config.log_level)
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    Agent(config).run(stop)
    return 0


def _status(config: AgentConfig, as_json: bool) -> int:
    from spotguard.agent.daemon import utc_now

    client = ImdsClient(
        config.imds_endpoint, token_ttl=config.token_ttl, timeout=config.request_timeout
    )
    report: dict[str, dict[str, object]] = {}
    unknown = False
    try:
        for watch in watches_from_config(config):
            try:
                notice = watch.evaluate(client.get(watch.path), utc_now())
            except ImdsError as exc:
                unknown = True
                report[watch.name] = {"state": "unknown", "reason": str(exc)}
                continue
            if notice is None:
                report[watch.name] = {"state": "none"}
            else:
                report[watch.name] = {"state": "notice", "notice": notice.to_json()}
    finally:
        client.close()
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        for name, entry in report.items():
            line = f"{name:26} {entry['state']}"
            published = entry.get("notice")
            if isinstance(published, dict):
                deadline = published["deadline"] or "no deadline"
                line += f": {published['action']}, deadline {deadline}"
            elif "reason" in entry:
                line += f": {entry['reason']}"
            print(line)
        print(f"{'checked at':26} {format_time(utc_now())}")
    return 1 if unknown else 0


def _imds_sim(host: str, port: int) -> int:
    from spotguard.agent.imds_sim import ImdsSimulator

    try:
        sim = ImdsSimulator(host, port)
    except OSError as exc:
        print(
            f"spotguard imds-sim: cannot listen on {host}:{port}: {exc.strerror}", file=sys.stderr
        )
        return 2
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    print(f"IMDS simulator listening on {sim.url}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        sim.serve_forever()
    return 0


def _fleet_render(config: Path, out: Path | None) -> int:
    from spotguard.fleet.render import RenderError, dumps, render_file

    try:
        document = dumps(render_file(config))
    except RenderError as exc:
        print(f"spotguard fleet render: {exc}", file=sys.stderr)
        return 2
    if out is None:
        sys.stdout.write(document)
    else:
        out.write_text(document)
    return 0


def _install_units(dest: Path) -> int:
    from spotguard.agent.units import install_units

    try:
        for path in install_units(dest):
            print(f"installed {path}")
    except OSError as exc:
        print(f"spotguard install-units: cannot write to {dest}: {exc.strerror}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    env = dict(os.environ) if environ is None else environ
    try:
        if args.command == "imds-sim":
            return _imds_sim(args.host, args.port)
        if args.command == "fleet":
            return _fleet_render(args.config, args.out)
        if args.command == "install-units":
            return _install_units(args.dest)
        if args.command == "ckpt":
            # Imported here: the agent itself never loads the trainer hooks.
            from spotguard.trainer_hooks.cli import run_ckpt

            return run_ckpt(args)
        if args.command == "drill":
            from spotguard.trainer_hooks.drill.cli import run_drill_command

            return run_drill_command(args)
        config = _load(args, env)
        if args.command == "status":
            return _status(config, args.json)
        return _run_agent(config)
    except ConfigError as exc:
        print(f"spotguard {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
