"""``spotguard fleet render``: model config YAML -> Terraform variables, strictly."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from spotguard.fleet.render import RenderError, render

BASE = {
    "model": {"name": "Llama2-7B finetune", "command": "python train.py --cfg 7b"},
    "infrastructure": {
        "region": "eu-west-1",
        "network": {"vpc_id": "vpc-0abc", "subnet_ids": ["subnet-a", "subnet-b"]},
        "training": {
            "instance_types": ["g5.12xlarge", "g6.12xlarge"],
            "allowed_instance_types": ["g5.*", "g6.*"],
            "allow_gpu_count_change": False,
            "capacity_units": 1,
            "on_demand_base_units": 1,
            "spot_max_price": 3.5,
            "ami_id": "ami-0abc",
            "root_volume_gb": 300,
            "spotguard_version": "0.1.0",
            "python": "/opt/conda/envs/train/bin/python",
        },
        "checkpoints": {"bucket": "my-ckpts", "prefix": "runs/llama"},
    },
    "tags": {"team": "ml", "cost-center": 42},
}


def test_every_key_maps_to_a_module_variable():
    assert render(BASE) == {
        "allow_gpu_count_change": False,
        "allowed_instance_types": ["g5.*", "g6.*"],
        "ami_id": "ami-0abc",
        "bucket_name": "my-ckpts",
        "checkpoint_prefix": "runs/llama",
        "create_bucket": False,
        "instance_types": ["g5.12xlarge", "g6.12xlarge"],
        "name": "llama2-7b-finetune",
        "on_demand_base_capacity": 1,
        "region": "eu-west-1",
        "root_volume_size_gb": 300,
        "spot_max_price": "3.5",
        "spotguard_version": "0.1.0",
        "subnet_ids": ["subnet-a", "subnet-b"],
        "tags": {"team": "ml", "cost-center": "42"},
        "target_capacity": 1,
        "training_command": "python train.py --cfg 7b",
        "training_python": "/opt/conda/envs/train/bin/python",
        "vpc_id": "vpc-0abc",
    }


def test_capacity_0_pauses_the_job():
    """0 is what a finished job leaves its fleet at: the config can say so (no drift)."""
    config = copy.deepcopy(BASE)
    config["infrastructure"]["training"]["capacity_units"] = 0
    config["infrastructure"]["training"]["on_demand_base_units"] = 0
    assert render(config)["target_capacity"] == 0


MULTI_NODE = {
    "nodes": 3,
    "min_nodes": 2,
    "processes_per_node": 4,
    "cluster_placement_group": True,
    "capacity_units": 3,
    "on_demand_base_units": 0,
}


def test_a_job_across_nodes_renders_its_node_counts():
    config = copy.deepcopy(BASE)
    config["infrastructure"]["training"].update(MULTI_NODE)
    config["infrastructure"]["network"]["subnet_ids"] = ["subnet-a"]
    variables = render(config)
    assert {key: variables[key] for key in ("nodes", "min_nodes", "target_capacity")} == {
        "nodes": 3,
        "min_nodes": 2,
        "target_capacity": 3,
    }
    assert (variables["processes_per_node"], variables["cluster_placement_group"]) == ("4", True)
    config["infrastructure"]["training"]["capacity_units"] = 0  # paused
    assert render(config)["target_capacity"] == 0


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("capacity_units", 2, "capacity_units: 2 with nodes 3: capacity_units is nodes"),
        ("min_nodes", 4, "min_nodes: more than nodes (4 > 3)"),
        (
            "processes_per_node",
            "cpu",
            "processes_per_node: expected gpu (one process per GPU)",
        ),
        (
            "processes_per_node",
            0,
            "processes_per_node: expected gpu (one process per GPU)",
        ),
        ("on_demand_base_units", 4, "on_demand_base_units: more than capacity_units (4 > 3)"),
    ],
)
def test_bad_node_counts_name_the_key(key, value, message):
    config = copy.deepcopy(BASE)
    config["infrastructure"]["training"].update(MULTI_NODE)
    config["infrastructure"]["network"]["subnet_ids"] = ["subnet-a"]
    config["infrastructure"]["training"][key] = value
    with pytest.raises(RenderError, match=re.escape(f"infrastructure.training.{message}")):
        render(config)


def test_a_job_across_nodes_needs_one_subnet():
    config = copy.deepcopy(BASE)
    config["infrastructure"]["training"].update(MULTI_NODE)
    with pytest.raises(RenderError, match="one Availability Zone: give one subnet, not 2"):
        render(config)


def test_rendered_variables_are_all_declared_by_the_basic_example():
    declared = (Path(__file__).parents[2] / "fleet/examples/basic/variables.tf").read_text()
    config = copy.deepcopy(BASE)
    config["infrastructure"]["training"].update(MULTI_NODE)
    config["infrastructure"]["network"]["subnet_ids"] = ["subnet-a"]
    for name in {**render(BASE), **render(config)}:
        assert f'variable "{name}"' in declared


def test_the_allow_list_defaults_to_the_deep_learning_ami_families_and_can_be_widened():
    config = _with("infrastructure.training.instance_types", ["g5.xlarge", "t3.large"])
    del config["infrastructure"]["training"]["allowed_instance_types"]
    with pytest.raises(RenderError, match=r"'t3.large' is not in the GPU types .* widen"):
        render(config)
    config["infrastructure"]["training"]["allowed_instance_types"] = ["g5.*", "t3.large"]
    assert render(config)["instance_types"] == ["g5.xlarge", "t3.large"]


def _with(path: str, value: object) -> dict:
    config = json.loads(json.dumps(BASE))
    *parents, leaf = path.split(".")
    node = config
    for key in parents:
        node = node[key]
    node[leaf] = value
    return config


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("infrastructure.training.gpus", 8, "unknown key infrastructure.training.gpus"),
        ("modle", {}, "unknown key modle"),
        ("infrastructure.training.capacity_units", -1, "capacity_units: expected a whole number"),
        ("infrastructure.training.capacity_units", "4", "capacity_units: expected a whole number"),
        ("infrastructure.training.spot_max_price", "cheap", "spot_max_price: expected a price"),
        ("infrastructure.training.spot_max_price", -1, "spot_max_price: expected a price"),
        ("infrastructure.training.instance_types", [], "instance_types: expected a non-empty"),
        ("infrastructure.training.instance_types", "g5.xlarge", "instance_types: expected a"),
        ("infrastructure.network.vpc_id", "subnet-1", "vpc_id: expected an ID starting with"),
        ("infrastructure.training.on_demand_base_units", 9, "more than capacity_units"),
        ("model.command", "a\nb", "one line"),
        ("model.name", "!!", "use 3-32 characters"),
        ("infrastructure.training", [1], "infrastructure.training: expected a mapping"),
        (
            "infrastructure.training.instance_types",
            [f"g5.{i}xl" for i in range(26)],
            "50 overrides",
        ),
        ("infrastructure.training.capacity_units", 2, "capacity_units: 2 with nodes 1"),
        ("infrastructure.training.nodes", 0, "nodes: expected a whole number >= 1"),
        ("infrastructure.training.min_nodes", 1, "min_nodes: only for a job across several"),
        ("infrastructure.training.on_demand_base_units", 2, "more than capacity_units"),
        (
            "infrastructure.training.instance_types",
            ["g5.xlarge", "t3.large"],
            "'t3.large' is not in allowed_instance_types",
        ),
        ("infrastructure.training.allowed_instance_types", ["G5.*"], "'G5.*' is not an instance"),
        ("infrastructure.training.allow_gpu_count_change", "yes", "expected true or false"),
        ("tags", {"aws:team": "ml"}, "'aws:team' is not a tag key EC2 accepts"),
        ("tags", {"a,b": "ml"}, "'a,b' is not a tag key"),
        ("infrastructure.checkpoints.expiration_days", 30, "newest checkpoint of a paused run"),
        ("infrastructure.checkpoints.new_bucket", "other", "not both"),
    ],
)
def test_bad_keys_and_values_name_the_key(path, value, message):
    with pytest.raises(RenderError, match=message.replace("(", r"\(")):
        render(_with(path, value))


def test_an_existing_bucket_is_used_and_a_new_one_created():
    """``bucket`` names a bucket that exists (Terraform must not create it again);
    ``new_bucket`` names one to create; with neither, the module derives a name."""
    existing = render(BASE)
    assert (existing["bucket_name"], existing["create_bucket"]) == ("my-ckpts", False)
    config = json.loads(json.dumps(BASE))
    config["infrastructure"]["checkpoints"] = {"new_bucket": "fresh-ckpts"}
    created = render(config)
    assert created["bucket_name"] == "fresh-ckpts"
    assert "create_bucket" not in created  # the module's default: create
    del config["infrastructure"]["checkpoints"]
    derived = render(config)
    assert "bucket_name" not in derived
    assert "create_bucket" not in derived


def test_tag_keys_with_spaces_and_slashes_pass():
    config = _with("tags", {"cost center/team": "ml research"})
    assert render(config)["tags"] == {"cost center/team": "ml research"}


def test_required_keys():
    config = json.loads(json.dumps(BASE))
    del config["infrastructure"]["network"]["subnet_ids"]
    with pytest.raises(
        RenderError, match=r"missing required key infrastructure\.network\.subnet_ids"
    ):
        render(config)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spotguard", "fleet", "render", *args],
        capture_output=True,
        text=True,
    )


def test_cli_writes_tfvars_json(tmp_path):
    import yaml

    config = tmp_path / "model_config.yaml"
    config.write_text(yaml.safe_dump(BASE))
    out = tmp_path / "fleet.auto.tfvars.json"
    done = run_cli(str(config), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text()) == render(BASE)
    printed = run_cli(str(config))
    assert json.loads(printed.stdout) == render(BASE)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("model: [unclosed", "line 1 not valid YAML"),
        ("- a list\n", "the config must be a mapping"),
        ("model: {name: x1x, command: go}\nextra: 1\n", "unknown key extra"),
    ],
)
def test_cli_errors_are_one_line_with_exit_2(tmp_path, text, message):
    config = tmp_path / "c.yaml"
    config.write_text(text)
    done = run_cli(str(config))
    assert done.returncode == 2
    assert message in done.stderr
    assert done.stderr.count("\n") == 1
    assert str(config) in done.stderr


def test_cli_missing_file(tmp_path):
    done = run_cli(str(tmp_path / "nope.yaml"))
    assert done.returncode == 2
    assert "cannot read" in done.stderr
