"""``spotguard fleet render``: a model/infrastructure YAML becomes Terraform variables JSON."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

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


def _render(args: argparse.Namespace) -> int:
    from spotguard.fleet.render import dumps, render_file

    document = dumps(render_file(args.config))  # a RenderError is a ConfigError: exit 2
    if args.out is None:
        sys.stdout.write(document)
    else:
        args.out.write_text(document)
    return 0
