"""``spotguard agent`` (the on-node daemon systemd runs) and ``spotguard status`` (one look at
IMDS, printed): both read the agent's configuration, so they share its flags."""

from __future__ import annotations

import argparse
import json
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from spotguard.agent.config import DEFAULT_CONFIG_PATH, AgentConfig, load_config
from spotguard.agent.logs import configure_logging
from spotguard.agent.watches import watches_from_config
from spotguard.errors import ImdsError
from spotguard.imds.client import ImdsClient
from spotguard.protocol import DEFAULT_STATE_DIR, format_time

__all__ = ["register"]


def _config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help=f"TOML file (default {DEFAULT_CONFIG_PATH})")
    parser.add_argument(
        "--imds-endpoint", help=f"IMDS base URL (default {AgentConfig.imds_endpoint})"
    )


def register(commands: Any) -> None:
    agent = commands.add_parser("agent", help="run the on-node daemon")
    _config_flags(agent)
    agent.add_argument(
        "--state-dir", help=f"shared with the trainer hooks (default {DEFAULT_STATE_DIR})"
    )
    agent.add_argument("--poll-interval", type=float, help="seconds between polls (default 1)")
    agent.set_defaults(handler=_run_agent)

    status = commands.add_parser("status", help="poll IMDS once and print what it says now")
    _config_flags(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(handler=_status)


def _load(args: argparse.Namespace) -> AgentConfig:
    overrides = {
        "imds_endpoint": args.imds_endpoint,
        "state_dir": getattr(args, "state_dir", None),
        "poll_interval": getattr(args, "poll_interval", None),
    }
    return load_config(args.config, environ=args.environ, overrides=overrides)


def _run_agent(args: argparse.Namespace) -> int:
    from spotguard.agent.daemon import Agent

    config = _load(args)
    configure_logging(config.log_format, config.log_level)
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    Agent(config).run(stop)
    return 0


def _status(args: argparse.Namespace) -> int:
    from spotguard.agent.daemon import utc_now

    config = _load(args)
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
    if args.json:
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
