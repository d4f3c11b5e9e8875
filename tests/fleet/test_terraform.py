"""The module and the examples: formatted, valid, and the module's unit suite passes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tests.fleet.conftest import (
    FLEET,
    MIRROR_VARIABLE,
    MODULE,
    Terraform,
    choose_plugin_mirror,
    cli_config_text,
    copy_config,
)

EXAMPLES = sorted(path for path in (FLEET / "examples").iterdir() if path.is_dir())


def test_everything_is_formatted(terraform: Terraform):
    done = terraform("fmt", "-check", "-recursive", "-diff", str(FLEET), cwd=FLEET, check=False)
    assert done.returncode == 0, f"run terraform fmt -recursive fleet/:\n{done.stdout}"


@pytest.mark.parametrize("config", [MODULE, *EXAMPLES], ids=lambda path: path.name)
def test_validates_with_the_real_provider(terraform: Terraform, tmp_path: Path, config: Path):
    work = copy_config(config, tmp_path)
    terraform("init", "-backend=false", cwd=work)
    done = terraform("validate", cwd=work)
    assert "The configuration is valid" in done.stdout


@pytest.mark.timeout(300)
def test_module_unit_suite_with_the_mocked_provider(terraform: Terraform, tmp_path: Path):
    work = copy_config(MODULE, tmp_path)
    terraform("init", "-backend=false", cwd=work)
    done = terraform("test", cwd=work, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 failed" in done.stdout
    passed = re.findall(r'^\s+run "[^"]+"\.\.\. pass$', done.stdout, re.M)
    assert len(passed) == (MODULE / "tests" / "unit.tftest.hcl").read_text().count('\nrun "')


def test_remote_state_example_locks_and_checks_drift():
    backend = (FLEET / "examples" / "remote-state" / "backend.tf").read_text()
    assert "use_lockfile = true" in backend
    workflow = yaml.safe_load(
        (FLEET / "examples" / "remote-state" / "drift-detection.yml").read_text()
    )
    assert workflow[True]["schedule"][0]["cron"]  # "on" parses as True in YAML 1.1
    steps = workflow["jobs"]["drift"]["steps"]
    plan = next(step for step in steps if step.get("id") == "plan")
    assert "plan" in plan["run"]
    assert "-detailed-exitcode" in plan["run"]
    assert 'exit "$code"' in plan["run"]


def test_every_variable_and_output_is_documented_in_the_module_readme():
    readme = (MODULE / "README.md").read_text()
    for kind, source in (("variable", "variables.tf"), ("output", "outputs.tf")):
        text = (MODULE / source).read_text()
        names = [line.split('"')[1] for line in text.splitlines() if line.startswith(f"{kind} ")]
        assert names, source
        for name in names:
            assert f"| `{name}` |" in readme, f"{kind} {name} is missing from the README table"


def _mirror(root: Path) -> Path:
    """A filesystem mirror as Terraform lays one out, holding an AWS provider."""
    (root / "registry.terraform.io" / "hashicorp" / "aws" / "5.100.0").mkdir(parents=True)
    return root


def test_the_mirror_named_in_the_environment_wins(tmp_path: Path):
    named, known = _mirror(tmp_path / "named"), _mirror(tmp_path / "known")
    assert choose_plugin_mirror({MIRROR_VARIABLE: str(named)}, [known]) == named.resolve()


def test_a_named_folder_without_the_provider_is_an_error_not_the_registry(tmp_path: Path):
    """A typo in the variable must not quietly send an offline machine to the network."""
    known = _mirror(tmp_path / "known")
    with pytest.raises(ValueError, match=f"{MIRROR_VARIABLE}=.*holds no"):
        choose_plugin_mirror({MIRROR_VARIABLE: str(tmp_path / "empty")}, [known])


def test_the_first_known_location_holding_the_provider_is_used(tmp_path: Path):
    empty = tmp_path / "empty"
    (empty / "registry.terraform.io" / "hashicorp" / "null").mkdir(parents=True)
    second, third = _mirror(tmp_path / "second"), _mirror(tmp_path / "third")
    assert choose_plugin_mirror({}, [tmp_path / "missing", empty, second, third]) == second


def test_without_a_mirror_the_registry_is_used_through_a_cache(tmp_path: Path):
    assert choose_plugin_mirror({MIRROR_VARIABLE: " "}, [tmp_path / "missing"]) is None
    text = cli_config_text(None, tmp_path / "cache")
    assert "provider_installation" not in text  # the registry, Terraform's default
    assert f'plugin_cache_dir = "{tmp_path / "cache"}"' in text


def test_with_a_mirror_hashicorp_providers_come_from_it_only(tmp_path: Path):
    text = cli_config_text(tmp_path / "mirror")
    assert f'path    = "{tmp_path / "mirror"}"' in text
    assert 'include = ["registry.terraform.io/hashicorp/*"]' in text
    assert 'exclude = ["registry.terraform.io/hashicorp/*"]' in text


def test_the_generated_config_is_what_terraform_reads(terraform: Terraform, tmp_path: Path):
    """The session's config, not an inherited TF_CLI_CONFIG_FILE (which may name a file that
    does not exist): Terraform warns about a config it cannot open."""
    done = terraform("version", cwd=tmp_path)
    assert "Unable to open CLI configuration file" not in done.stdout + done.stderr
    assert not (FLEET / "terraform.rc").exists(), "a committed config names one machine's folders"


@pytest.mark.timeout(120)
def test_the_fleet_waits_for_its_permissions_and_bucket(terraform: Terraform, tmp_path: Path):
    """Creation follows the graph's edges, and destruction runs them backwards: a node never
    boots before its role's policies and its bucket exist, and on destroy the fleet (and its
    instances) goes before them, so a last emergency save is not denied."""
    work = copy_config(MODULE, tmp_path)
    terraform("init", "-backend=false", cwd=work)
    graph = terraform("graph", cwd=work).stdout
    after: dict[str, set[str]] = {}
    for source, target in re.findall(r'^\s*"([^"]+)" -> "([^"]+)"', graph, re.M):
        after.setdefault(source, set()).add(target)
    reached, todo = set(), ["aws_ec2_fleet.training"]
    while todo:  # the graph is drawn reduced: follow it to everything the fleet waits for
        for target in after.get(todo.pop(), ()):
            if target not in reached:
                reached.add(target)
                todo.append(target)
    for needed in (
        "aws_iam_role_policy.nodes",
        "aws_iam_role_policy_attachment.ssm",
        "aws_s3_bucket.checkpoints",
        "aws_s3_bucket_policy.checkpoints",
        "aws_s3_bucket_server_side_encryption_configuration.checkpoints",
        "aws_s3_bucket_lifecycle_configuration.checkpoints",
        "aws_kms_grant.fleet_volumes",
    ):
        assert needed in reached, needed
