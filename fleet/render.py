"""``spotguard fleet render CONFIG.yaml``: a model/infrastructure config -> Terraform variables.

The config has the shape of a ``model_config.yaml`` that describes a training job and where it
runs; the output is JSON for ``examples/basic`` (``fleet.auto.tfvars.json``), whose variables
pass through to the ``spot-training-fleet`` module::

    model:
      name: llama2-7b-finetune            # -> name (lower-cased, other characters -> "-")
      command: python train.py --cfg 7b   # -> training_command
    infrastructure:
      region: us-east-1                   # -> region
      network: {vpc_id: vpc-0abc, subnet_ids: [subnet-a, subnet-b]}
      training:
        instance_types: [g5.12xlarge, g6.12xlarge]
        allowed_instance_types: [g5.*, g6.*]  # optional: the default is the DLAMI's GPU families
        allow_gpu_count_change: false     # optional: true if the job resumes at any world size
        nodes: 1                          # -> nodes (more: one torchrun job across them)
        min_nodes: 2                      # optional, nodes > 1: fewest nodes it runs on
        processes_per_node: gpu           # optional, nodes > 1: torchrun --nproc-per-node
        cluster_placement_group: false    # optional, nodes > 1
        capacity_units: 1                 # -> target_capacity (nodes: it runs; 0: paused)
        on_demand_base_units: 0           # -> on_demand_base_capacity
        spot_max_price: 4.10              # -> spot_max_price ("4.10")
        ami_id: ami-0abc                  # optional
        root_volume_gb: 300               # -> root_volume_size_gb
        python: /opt/pytorch/bin/python   # -> training_python (the AMI's PyTorch env)
        spotguard_version: 0.1.0          # optional: the wheel must be this version
        spotguard_wheel: dist/spotguard-0.1.0-py3-none-any.whl  # optional; default: dist/
      checkpoints: {bucket: my-ckpts, prefix: runs/llama}  # an existing bucket, used as is
      # or {new_bucket: my-ckpts, ...} to create one; with neither, one with a derived name
    tags: {team: ml}

Every key is checked: an unknown key or a value of the wrong kind is a one-line error naming
the key (exit code 2), never a silently ignored setting.
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from spotguard.errors import RenderError

__all__ = ["RenderError", "dumps", "render", "render_file"]


def _text(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise RenderError(f"{key}: expected a non-empty string, got {value!r}")
    return value.strip()


def _name(key: str, value: Any) -> str:
    slug = re.sub(r"[^a-z0-9-]+", "-", _text(key, value).lower()).strip("-")
    if not 3 <= len(slug) <= 32:
        raise RenderError(f"{key}: {value!r} makes the fleet name {slug!r}; use 3-32 characters")
    return slug


def _command(key: str, value: Any) -> str:
    text = _text(key, value)
    if "\n" in text:
        raise RenderError(f"{key}: the training command must be one line")
    return text


def _whole(minimum: int) -> Callable[[str, Any], int]:
    def convert(key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise RenderError(f"{key}: expected a whole number >= {minimum}, got {value!r}")
        return value

    return convert


def _price(key: str, value: Any) -> str:
    text = value.strip() if isinstance(value, str) else repr(value)
    try:
        valid = not isinstance(value, bool) and float(text) > 0
    except ValueError:
        valid = False
    if not valid:
        raise RenderError(f"{key}: expected a price in USD per hour above 0, got {value!r}")
    return text


def _strings(key: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not value:
        raise RenderError(f"{key}: expected a non-empty list of strings, got {value!r}")
    return [_text(f"{key}[{index}]", item) for index, item in enumerate(value)]


def _prefixed(prefix: str) -> Callable[[str, Any], str]:
    def convert(key: str, value: Any) -> str:
        text = _text(key, value)
        if not text.startswith(prefix):
            raise RenderError(f"{key}: expected an ID starting with {prefix!r}, got {value!r}")
        return text

    return convert


def _tags(key: str, value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise RenderError(f"{key}: expected a mapping of tag names to values")
    tags = {tag: str(text) for tag, text in value.items()}
    for tag, text in tags.items():
        valid_key = 1 <= len(tag) <= 128 and not tag.lower().startswith("aws:")
        if not (valid_key and _TAG_TEXT.fullmatch(tag)):
            raise RenderError(
                f"{key}: {tag!r} is not a tag key EC2 accepts (1-128 letters, digits, spaces "
                "and _ . : / = + - @, not starting with aws:)"
            )
        if len(text) > 256 or not _TAG_TEXT.fullmatch(text):
            raise RenderError(f"{key}.{tag}: {text!r} is not a tag value EC2 accepts")
    return tags


#: As the module's ``allowed_instance_types`` default: the x86_64 GPU families the Deep Learning
#: AMI (OSS NVIDIA driver, PyTorch) supports. A type outside it would fail the plan anyway; here
#: the error names the config key.
ALLOWED_INSTANCE_TYPES = (
    "g4dn.*",
    "g5.*",
    "g6.*",
    "gr6.*",
    "g6e.*",
    "p4d.*",
    "p4de.*",
    "p5.*",
    "p5e.*",
    "p5en.*",
    "p6-b200.*",
)
#: EC2's rule for tag keys and values (the module validates the same).
_TAG_TEXT = re.compile(r"[\w .:/=+@-]*")


_PATTERN = re.compile(r"[a-z0-9*][a-z0-9.*-]*")


def _patterns(key: str, value: Any) -> list[str]:
    patterns = _strings(key, value)
    for index, pattern in enumerate(patterns):
        if not _PATTERN.fullmatch(pattern):
            raise RenderError(
                f"{key}[{index}]: {pattern!r} is not an instance type or pattern such as g5.*"
            )
    return patterns


def _flag(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise RenderError(f"{key}: expected true or false, got {value!r}")
    return value


def _check_instance_types(types: list[str], allowed: list[str] | None) -> None:
    """Each type must match the allow-list: the configured one, else the module's default."""
    patterns = allowed or list(ALLOWED_INSTANCE_TYPES)
    for index, name in enumerate(types):
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns):
            continue
        where = f"allowed_instance_types ({', '.join(patterns)})"
        if not allowed:
            where = (
                f"the GPU types the Deep Learning AMI supports ({', '.join(patterns)}); widen "
                "infrastructure.training.allowed_instance_types if your AMI supports more"
            )
        raise RenderError(
            f"infrastructure.training.instance_types[{index}]: {name!r} is not in {where}"
        )


def _processes(key: str, value: Any) -> str:
    if value == "gpu" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return str(value)
    raise RenderError(f"{key}: expected gpu (one process per GPU) or a number >= 1, got {value!r}")


def _version(key: str, value: Any) -> str:
    text = _text(key, str(value) if isinstance(value, (int, float)) else value)
    if not re.fullmatch(r"[0-9]+(\.[0-9]+){1,2}[a-z0-9.+-]*", text):
        raise RenderError(f"{key}: expected a version such as 0.1.0, got {value!r}")
    return text


#: Config key -> (Terraform variable, converter).
FIELDS: dict[str, tuple[str, Callable[[str, Any], Any]]] = {
    "model.name": ("name", _name),
    "model.command": ("training_command", _command),
    "infrastructure.region": ("region", _text),
    "infrastructure.network.vpc_id": ("vpc_id", _prefixed("vpc-")),
    "infrastructure.network.subnet_ids": ("subnet_ids", _strings),
    "infrastructure.training.instance_types": ("instance_types", _strings),
    "infrastructure.training.allowed_instance_types": ("allowed_instance_types", _patterns),
    "infrastructure.training.allow_gpu_count_change": ("allow_gpu_count_change", _flag),
    "infrastructure.training.nodes": ("nodes", _whole(1)),
    "infrastructure.training.min_nodes": ("min_nodes", _whole(1)),
    "infrastructure.training.processes_per_node": ("processes_per_node", _processes),
    "infrastructure.training.cluster_placement_group": ("cluster_placement_group", _flag),
    # 0 pauses the job, or says it ended (job-end set its fleet to 0); else it equals nodes.
    "infrastructure.training.capacity_units": ("target_capacity", _whole(0)),
    "infrastructure.training.on_demand_base_units": ("on_demand_base_capacity", _whole(0)),
    "infrastructure.training.spot_max_price": ("spot_max_price", _price),
    "infrastructure.training.ami_id": ("ami_id", _prefixed("ami-")),
    "infrastructure.training.root_volume_gb": ("root_volume_size_gb", _whole(8)),
    "infrastructure.training.spotguard_version": ("spotguard_version", _version),
    # Default: the one wheel `spotguard fleet package` put in dist/ (examples/basic finds it).
    "infrastructure.training.spotguard_wheel": ("spotguard_wheel_path", _text),
    "infrastructure.training.python": ("training_python", _prefixed("/")),
    # An existing bucket, used as it is (create_bucket = false); new_bucket names one to create.
    "infrastructure.checkpoints.bucket": ("bucket_name", _text),
    "infrastructure.checkpoints.new_bucket": ("bucket_name", _text),
    "infrastructure.checkpoints.prefix": ("checkpoint_prefix", _text),
    "tags": ("tags", _tags),
}
#: Keys that once existed, with why they are gone: an error that says so beats "unknown key".
REMOVED = {
    "infrastructure.checkpoints.expiration_days": (
        "current checkpoints never expire by age: the newest checkpoint of a paused run is what "
        "resumes it, and the trainer hooks prune old ones themselves"
    ),
}
REQUIRED = (
    "model.name",
    "model.command",
    "infrastructure.network.vpc_id",
    "infrastructure.network.subnet_ids",
)
_SECTIONS = {key.rsplit(".", 1)[0] for key in FIELDS if "." in key}
_SECTIONS |= {section.rsplit(".", 1)[0] for section in list(_SECTIONS) if "." in section}


def _walk(node: Mapping[str, Any], prefix: str, found: dict[str, Any]) -> None:
    for key, value in node.items():
        path = f"{prefix}{key}"
        if not isinstance(key, str):
            raise RenderError(f"{prefix or 'top level'}: keys must be strings, got {key!r}")
        if path in REMOVED:
            raise RenderError(f"{path} is no longer accepted: {REMOVED[path]}")
        if path in FIELDS:
            found[path] = value
        elif path in _SECTIONS:
            if not isinstance(value, dict):
                raise RenderError(f"{path}: expected a mapping, got {value!r}")
            _walk(value, f"{path}.", found)
        else:
            siblings = sorted(
                k[len(prefix) :].split(".")[0] for k in FIELDS if k.startswith(prefix)
            )
            raise RenderError(
                f"unknown key {path} (known here: {', '.join(sorted(set(siblings)))})"
            )


def render(config: Any) -> dict[str, Any]:
    """Terraform variables for ``examples/basic`` from a parsed config."""
    if not isinstance(config, dict):
        raise RenderError("the config must be a mapping with model and infrastructure sections")
    found: dict[str, Any] = {}
    _walk(config, "", found)
    missing = [key for key in REQUIRED if key not in found]
    if missing:
        raise RenderError(f"missing required key {missing[0]}")
    if (
        "infrastructure.checkpoints.bucket" in found
        and "infrastructure.checkpoints.new_bucket" in found
    ):
        raise RenderError(
            "infrastructure.checkpoints: give bucket (an existing one) or new_bucket (to create), "
            "not both"
        )
    variables = {}
    for key, value in found.items():
        variable, convert = FIELDS[key]
        variables[variable] = convert(key, value)
    if "infrastructure.checkpoints.bucket" in found:
        # Naming a bucket means using it: creating it again would fail, or worse, succeed.
        variables["create_bucket"] = False
    _check_nodes(variables)
    types, subnets = variables.get("instance_types"), variables["subnet_ids"]
    if types is not None:
        _check_instance_types(types, variables.get("allowed_instance_types"))
    if types is not None and len(types) * len(subnets) > 50:
        raise RenderError(
            f"infrastructure.training.instance_types: {len(types)} types x {len(subnets)} "
            "subnets is more than the 50 overrides EC2 Fleet accepts"
        )
    return dict(sorted(variables.items()))


def _check_nodes(variables: dict[str, Any]) -> None:
    """The node counts against each other, as the module checks them."""
    nodes = variables.get("nodes", 1)
    capacity = variables.get("target_capacity", nodes)
    key = "infrastructure.training"
    if capacity not in (0, nodes):
        raise RenderError(
            f"{key}.capacity_units: {capacity} with nodes {nodes}: capacity_units is nodes (the "
            "job runs) or 0 (paused); a job across several nodes is nodes: N"
        )
    if variables.get("min_nodes", 1) > nodes:
        raise RenderError(f"{key}.min_nodes: more than nodes ({variables['min_nodes']} > {nodes})")
    multi_node_only = ("min_nodes", "processes_per_node", "cluster_placement_group")
    given = [name for name in multi_node_only if name in variables]
    if nodes == 1 and given:
        raise RenderError(f"{key}.{given[0]}: only for a job across several nodes (nodes > 1)")
    if nodes > 1 and len(variables["subnet_ids"]) != 1:
        raise RenderError(
            "infrastructure.network.subnet_ids: a job across several nodes runs in one "
            f"Availability Zone: give one subnet, not {len(variables['subnet_ids'])}"
        )
    on_demand = variables.get("on_demand_base_capacity", 0)
    if on_demand > capacity:
        raise RenderError(
            f"{key}.on_demand_base_units: more than capacity_units ({on_demand} > {capacity})"
        )


def render_file(path: Path) -> dict[str, Any]:
    """Read ``path`` (YAML) and render it; errors name the file and the key."""
    try:
        import yaml
    except ImportError:
        raise RenderError("reading YAML needs PyYAML: pip install 'spotguard[fleet]'") from None
    try:
        text = path.read_text()
    except OSError as exc:
        raise RenderError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise RenderError(f"{path}:{where} not valid YAML") from None
    try:
        return render(config)
    except RenderError as exc:
        raise RenderError(f"{path}: {exc}") from None


def dumps(variables: Mapping[str, Any]) -> str:
    """The variables as a ``.tfvars.json`` document."""
    return json.dumps(variables, indent=2) + "\n"
