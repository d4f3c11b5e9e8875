"""``spotguard fleet render|package|job-end|wait-clear``: the fleet's helpers.

``render`` and ``package`` run on the operator's machine (Terraform variables from a model
config; the wheel the nodes install). ``job-end`` and ``wait-clear`` run on the nodes, from the
training unit (``systemd/spotguard-training@.service``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from spotguard.errors import ConfigError, SpotguardError
from spotguard.protocol import DEFAULT_STATE_DIR, STATE_DIR_ENV

__all__ = ["register"]


def register(commands: Any) -> None:
    fleet = commands.add_parser("fleet", help="provisioning helpers for the Terraform module")
    fleet_commands = fleet.add_subparsers(
        dest="fleet_command", required=True, parser_class=type(fleet)
    )
    render = fleet_commands.add_parser(
        "render", help="model/infrastructure YAML -> Terraform variables JSON"
    )
    render.add_argument("config", type=Path, help="model_config.yaml")
    render.add_argument("--out", type=Path, help="write here (default: standard output)")
    render.set_defaults(handler=_render, command="fleet render")  # names it in errors

    package = fleet_commands.add_parser(
        "package", help="build the wheel of this spotguard for the nodes (prints SHA-256, path)"
    )
    package.add_argument(
        "--dest", type=Path, default=Path("dist"), help="folder for the wheel (default ./dist)"
    )
    package.add_argument(
        "--source", type=Path, help="spotguard checkout (default: the one this one runs from)"
    )
    package.set_defaults(handler=_package, command="fleet package")

    job_end = fleet_commands.add_parser(
        "job-end", help="on a node: act on the end of the training process (ExecStopPost)"
    )
    job_end.add_argument("job", help="the fleet's name (the training unit's instance, %%i)")
    job_end.add_argument("--status-uri", help="default $SPOTGUARD_STATUS_URI")
    job_end.add_argument("--instance-id", help="default $SPOTGUARD_INSTANCE_ID")
    job_end.add_argument("--region", help="default $AWS_DEFAULT_REGION")
    job_end.add_argument("--max-failures", type=int, help="default $SPOTGUARD_MAX_FAILURES or 3")
    job_end.add_argument("--state-dir", type=Path, default=Path("/var/lib/spotguard"))
    job_end.set_defaults(handler=_job_end, command="fleet job-end")

    wait = fleet_commands.add_parser(
        "wait-clear", help="on a node: wait while a notice that stops training is active"
    )
    wait.add_argument(
        "--state-dir", type=Path, help=f"default ${STATE_DIR_ENV} or {DEFAULT_STATE_DIR}"
    )
    wait.add_argument("--interval", type=float, default=5.0, help="seconds between looks")
    wait.set_defaults(handler=_wait_clear, command="fleet wait-clear")


def _render(args: argparse.Namespace) -> int:
    from spotguard.fleet.render import dumps, render_file

    document = dumps(render_file(args.config))  # a RenderError is a ConfigError: exit 2
    if args.out is None:
        sys.stdout.write(document)
    else:
        args.out.write_text(document)
    return 0


def _package(args: argparse.Namespace) -> int:
    from spotguard.fleet.package import BuiltWheel

    try:
        wheel = BuiltWheel.build(args.dest, args.source)
    except ConfigError:
        raise
    except SpotguardError as exc:
        print(f"spotguard fleet package: {exc}", file=sys.stderr)
        return 1
    print(f"{wheel.sha256}  {os.path.relpath(wheel.path)}")  # the sha256sum format
    return 0


def _job_end(args: argparse.Namespace) -> int:
    from spotguard.fleet.job_end import JobEnd
    from spotguard.protocol import state_dir_from_env

    env = args.environ
    max_failures = args.max_failures
    if max_failures is None:
        text = env.get("SPOTGUARD_MAX_FAILURES", "3")
        if not text.isdigit():
            raise ConfigError(f"SPOTGUARD_MAX_FAILURES: expected a whole number, got {text!r}")
        max_failures = int(text)
    policy = JobEnd(
        job=args.job,
        status_uri=args.status_uri or env.get("SPOTGUARD_STATUS_URI", ""),
        instance_id=args.instance_id or env.get("SPOTGUARD_INSTANCE_ID", ""),
        region=args.region or env.get("AWS_DEFAULT_REGION", ""),
        max_failures=max_failures,
        state_dir=args.state_dir,
        notice_dir=state_dir_from_env(env),
        checkpoint_uri=env.get("SPOTGUARD_CHECKPOINT_URI") or None,
        rendezvous_instance_id=env.get("SPOTGUARD_RENDEZVOUS_INSTANCE_ID") or None,
    )
    try:
        decision = policy.handle(
            env.get("EXIT_CODE"), env.get("EXIT_STATUS"), env.get("SERVICE_RESULT")
        )
    except SpotguardError as exc:
        print(f"spotguard fleet job-end: {exc}", file=sys.stderr)
        return 1
    print(f"spotguard fleet job-end: {policy.unit}: {decision}")
    return 0


def _wait_clear(args: argparse.Namespace) -> int:
    from spotguard.fleet.resume_gate import wait_until_clear
    from spotguard.protocol import state_dir_from_env

    state_dir = args.state_dir or state_dir_from_env(args.environ)
    # A bad --interval is wait_until_clear's ConfigError: one line, exit 2.
    wait_until_clear(state_dir, interval=args.interval, say=lambda line: print(line, flush=True))
    return 0
