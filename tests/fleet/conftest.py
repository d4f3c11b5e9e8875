"""Terraform for the fleet tests: the real binary and the real AWS provider.

The provider comes from a filesystem mirror where the machine has one (named by
``SPOTGUARD_TF_PLUGIN_MIRROR``, else found in a known place such as ``/opt/tf-plugins``), so
that machines built for offline work never reach the registry; elsewhere (a laptop, CI) it
comes from the registry, through a plugin cache so that it is downloaded once. Either way the
tests write their own CLI config into a temporary folder: a committed one could only name one
machine's folders, and an inherited ``TF_CLI_CONFIG_FILE`` may name a file that does not exist.
Working copies go to temporary folders so that tests never leave ``.terraform`` state in the
checkout or trip over each other. The suite runs on two pytest-xdist workers (Makefile); every
fleet test runs on one of them (``tests/conftest.py``, ``pytest_xdist_make_scheduler``): two
``terraform init`` at once would share the plugin cache, which Terraform does not support.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FLEET = REPO / "fleet"
MODULE = FLEET / "modules" / "spot-training-fleet"
HERE = Path(__file__).resolve().parent

#: Names the filesystem mirror to use (the folder holding ``registry.terraform.io/``).
MIRROR_VARIABLE = "SPOTGUARD_TF_PLUGIN_MIRROR"
#: Where machines built for offline work keep one, tried in this order.
KNOWN_MIRRORS = (
    Path("/opt/tf-plugins"),
    Path("/usr/local/share/terraform/plugins"),
    Path("/usr/share/terraform/plugins"),
    Path.home() / ".terraform.d" / "plugins",
)
#: Registry mode: providers are downloaded once into this cache, not once per test.
PLUGIN_CACHE = Path.home() / ".cache" / "spotguard" / "terraform-plugins"

Terraform = Callable[..., subprocess.CompletedProcess[str]]


def holds_aws_provider(mirror: Path) -> bool:
    return any(mirror.glob("registry.terraform.io/hashicorp/aws/*"))


def choose_plugin_mirror(
    environ: Mapping[str, str], candidates: Sequence[Path] = KNOWN_MIRRORS
) -> Path | None:
    """The filesystem mirror to install providers from, or None for the registry.

    A mirror named in ``SPOTGUARD_TF_PLUGIN_MIRROR`` must hold the AWS provider: a typo
    there raises instead of quietly falling back to the network. Otherwise the first known
    location that holds it wins.
    """
    named = environ.get(MIRROR_VARIABLE, "").strip()
    if named:
        mirror = Path(named).expanduser()
        if not holds_aws_provider(mirror):
            raise ValueError(
                f"{MIRROR_VARIABLE}={named} holds no registry.terraform.io/hashicorp/aws/*"
                " (name the folder that holds registry.terraform.io/)"
            )
        return mirror.resolve()
    return next((path for path in candidates if holds_aws_provider(path)), None)


def cli_config_text(mirror: Path | None, plugin_cache: Path = PLUGIN_CACHE) -> str:
    """A Terraform CLI config that installs HashiCorp's providers from ``mirror`` only, or,
    without one, from the registry through ``plugin_cache``."""
    if mirror is None:
        return (
            "# No filesystem mirror found: providers come from the registry, once.\n"
            f'plugin_cache_dir = "{plugin_cache}"\n'
        )
    return f"""# Providers from the filesystem mirror only: nothing is downloaded.
provider_installation {{
  filesystem_mirror {{
    path    = "{mirror}"
    include = ["registry.terraform.io/hashicorp/*"]
  }}
  direct {{
    exclude = ["registry.terraform.io/hashicorp/*"]
  }}
}}
"""


@pytest.fixture(scope="session")
def terraform_cli_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The generated CLI config (see the module docstring), one per test session."""
    try:
        mirror = choose_plugin_mirror(os.environ)
    except ValueError as exc:
        pytest.fail(str(exc))
    if mirror is None:
        PLUGIN_CACHE.mkdir(parents=True, exist_ok=True)
    path = tmp_path_factory.mktemp("terraform-cli") / "terraform.rc"
    path.write_text(cli_config_text(mirror))
    return path


def terraform_env(cli_config: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {
        **os.environ,
        "TF_CLI_CONFIG_FILE": str(cli_config),
        "CHECKPOINT_DISABLE": "1",
        "TF_IN_AUTOMATION": "1",
        "TF_INPUT": "0",
    }
    return {**env, **(extra or {})}


@pytest.fixture(scope="session")
def terraform(terraform_cli_config: Path) -> Terraform:
    """``terraform(*args, cwd=..., env=..., check=True)``; fails clearly where it cannot run."""
    binary = shutil.which("terraform")
    if binary is None:
        pytest.fail("terraform is not on PATH (the fleet tests need terraform >= 1.9)")

    def run(
        *args: str, cwd: Path, env: dict[str, str] | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [binary, *args, "-no-color"] if args[0] not in ("fmt", "output") else [binary, *args],
            cwd=cwd,
            env=terraform_env(terraform_cli_config, env),
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


#: Merged into the module's bucket policy on moto (an override file). moto evaluates a bucket
#: policy's statements without their conditions on object requests (moto/s3/responses.py), so
#: the TLS-only Deny refused every object request, the wheel's upload included, though it came
#: over HTTPS. On moto the statement covers the bucket alone; its full form (bucket and objects)
#: is asserted by the ``terraform test`` suite (unit.tftest.hcl).
MOTO_BUCKET_POLICY_OVERRIDE = """
resource "aws_s3_bucket_policy" "checkpoints" {
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Sid       = "DenyInsecureTransport"
      Effect    = "Deny"
      Principal = "*"
      Action    = "s3:*"
      Resource  = [local.bucket_arn]
      Condition = { Bool = { "aws:SecureTransport" = "false" } }
    }]
  })
}
"""


#: Merged into the rendezvous host on moto (an override file): moto has no MonitorInstances,
#: which the provider calls for detailed monitoring and retries until its timeout. The module's
#: setting (true) is asserted by the ``terraform test`` suite (unit.tftest.hcl).
MOTO_INSTANCE_MONITORING_OVERRIDE = """
resource "aws_instance" "rendezvous" {
  monitoring = false
}
"""


def basic_example_on_moto(destination: Path) -> Path:
    work = copy_config(FLEET / "examples" / "basic", destination)
    (work / "moto_override.tf").write_text(MOTO_PROVIDER_OVERRIDE)
    module = destination / "modules" / "spot-training-fleet"
    (module / "moto_bucket_policy_override.tf").write_text(MOTO_BUCKET_POLICY_OVERRIDE)
    (module / "moto_monitoring_override.tf").write_text(MOTO_INSTANCE_MONITORING_OVERRIDE)
    return work
