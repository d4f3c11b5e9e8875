"""Terraform for the fleet tests: the real binary and the real AWS provider, offline.

The provider comes from the machine's filesystem mirror through the committed CLI config
(``fleet/terraform.rc``); nothing is downloaded. Working copies go to temporary folders so
that tests never leave ``.terraform`` state in the checkout or trip over each other.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FLEET = REPO / "fleet"
MODULE = FLEET / "modules" / "spot-training-fleet"
CLI_CONFIG = FLEET / "terraform.rc"

Terraform = Callable[..., subprocess.CompletedProcess[str]]


def terraform_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {
        **os.environ,
        "TF_CLI_CONFIG_FILE": str(CLI_CONFIG),
        "CHECKPOINT_DISABLE": "1",
        "TF_IN_AUTOMATION": "1",
        "TF_INPUT": "0",
    }
    return {**env, **(extra or {})}


@pytest.fixture(scope="session")
def terraform() -> Terraform:
    """``terraform(*args, cwd=..., env=..., check=True)``; fails clearly where it cannot run."""
    binary = shutil.which("terraform")
    if binary is None:
        pytest.fail("terraform is not on PATH (the fleet tests need terraform >= 1.9)")
    mirror = CLI_CONFIG.read_text().split('path    = "', 1)[1].split('"', 1)[0]
    if not any(Path(mirror).glob("registry.terraform.io/hashicorp/aws/*")):
        pytest.fail(f"no AWS provider in the filesystem mirror {mirror} named by {CLI_CONFIG}")

    def run(
        *args: str, cwd: Path, env: dict[str, str] | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [binary, *args, "-no-color"] if args[0] not in ("fmt", "output") else [binary, *args],
            cwd=cwd,
            env=terraform_env(env),
            capture_output=True,
            text=True,
            timeout=600,
        )
        if check and done.returncode != 0:
            pytest.fail(
                f"terraform {' '.join(args)} in {cwd} failed:\n{done.stdout}\n{done.stderr}"
            )
        return done

    return run


def copy_config(source: Path, destination: Path) -> Path:
    """A working copy of ``source`` whose ``../../modules`` still resolves."""
    shutil.copytree(
        MODULE,
        destination / "modules" / "spot-training-fleet",
        ignore=shutil.ignore_patterns(".terraform*"),
    )
    target = destination / "examples" / source.name
    if source != MODULE:
        shutil.copytree(source, target, ignore=shutil.ignore_patterns(".terraform*", "*.tfstate*"))
        return target
    return destination / "modules" / "spot-training-fleet"


#: Merged into the example's provider block (an override file): a local emulator speaks
#: path-style S3 only, and the account guard makes a real account unreachable by mistake.
MOTO_PROVIDER_OVERRIDE = """
provider "aws" {
  s3_use_path_style   = true
  allowed_account_ids = ["123456789012"]
}
"""


@pytest.fixture
def moto_env(moto_server: str) -> dict[str, str]:
    """Environment for boto3 and the AWS provider to reach the moto server, never AWS."""
    return {
        "AWS_ENDPOINT_URL": moto_server,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def basic_example_on_moto(destination: Path) -> Path:
    work = copy_config(FLEET / "examples" / "basic", destination)
    (work / "moto_override.tf").write_text(MOTO_PROVIDER_OVERRIDE)
    return work
