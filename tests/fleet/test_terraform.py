"""The module and the examples: formatted, valid, and the module's unit suite passes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tests.fleet.conftest import FLEET, MODULE, Terraform, copy_config

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
