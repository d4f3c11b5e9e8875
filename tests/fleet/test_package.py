"""The operator's own spotguard on the nodes, end to end (issue 14, item 3).

``spotguard fleet package`` builds the wheel offline; ``examples/basic`` picks it up from
``dist/`` and Terraform uploads it (a targeted apply against a moto server: only the object
and what it needs); the object holds exactly the wheel; then the rendered user data runs in a
sandbox with a real ``venv`` and a real ``pip`` that can reach no index at all, and the
``spotguard`` it installs is the uploaded file's.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

import boto3
import pytest

from spotguard.fleet.package import BuiltWheel
from tests.fleet.built_wheel import built_wheel, with_wheel
from tests.fleet.conftest import Terraform, basic_example_on_moto

pytestmark = pytest.mark.timeout(300)
REPO = Path(__file__).resolve().parents[2]


def _package(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spotguard", "fleet", "package", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_package_prints_sha256_and_path_and_keeps_one_wheel(tmp_path):
    (tmp_path / "dist").mkdir()
    (tmp_path / "dist" / "spotguard-0.0.1-py3-none-any.whl").write_bytes(b"an old build")
    done = _package(cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    digest, path = done.stdout.strip().split("  ")
    wheel = tmp_path / path
    assert wheel.parent == tmp_path / "dist"
    assert digest == hashlib.sha256(wheel.read_bytes()).hexdigest()
    assert [p.name for p in (tmp_path / "dist").iterdir()] == [wheel.name]  # the old one went
    # The same source builds the same bytes: Terraform's upload and the launch template stay.
    assert digest == built_wheel().sha256
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    for shipped in (
        "spotguard/cli/fleet.py",
        "spotguard/agent/daemon.py",
        "spotguard/fleet/job_end.py",
        "spotguard/units/spotguard-training@.service",
        "spotguard/units/spotguard-rendezvous.service",  # the multi-node rendezvous host's
    ):
        assert shipped in names
    assert not any(name.endswith(".pyc") or ".terraform" in name for name in names)


def test_package_from_somewhere_that_is_not_a_checkout_is_one_line(tmp_path):
    done = _package("--source", str(tmp_path), "--dest", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr == f"spotguard fleet package: --source: {tmp_path} has no pyproject.toml\n"


def _source_copy(folder: Path, pyproject: str | None = None) -> Path:
    """The files a wheel is built from, copied (or ``pyproject`` replaced)."""
    folder.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (REPO / name).is_file():
            shutil.copy2(REPO / name, folder / name)
    if pyproject is not None:
        (folder / "pyproject.toml").write_text(pyproject)
    return folder


def _build_system_requires() -> list[str]:
    return list(tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["requires"])


def test_the_fleet_extra_brings_the_build_backend_at_the_version_build_system_requires():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    fleet = config["project"]["optional-dependencies"]["fleet"]
    for requirement in _build_system_requires():
        assert requirement in fleet, f"the fleet extra lacks {requirement}"


def test_a_missing_build_backend_is_named_before_building(tmp_path):
    """A venv without setuptools (Python 3.12's) or with one too old: one line naming it,
    not pip's traceback."""
    source = _source_copy(
        tmp_path / "src",
        PYPROJECT_TEMPLATE.format(requires='["setuptools>=9999", "no-such-backend-xyz"]'),
    )
    done = _package("--source", str(source), "--dest", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert "setuptools>=9999 (found " in lines[0]
    assert "no-such-backend-xyz (not installed)" in lines[0]
    assert "fleet extra" in lines[0]
    assert not (tmp_path / "out").exists()


def test_a_failing_build_reports_what_failed_not_pips_last_line(tmp_path):
    source = _source_copy(
        tmp_path / "src",
        PYPROJECT_TEMPLATE.format(requires=json.dumps(_build_system_requires())).replace(
            'version = "0.1.0"', 'version = "not a version!"'
        ),
    )
    (source / "x").mkdir()
    (source / "x" / "__init__.py").write_text("")
    done = _package("--source", str(source), "--dest", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 1
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert "project.version" in done.stderr, done.stderr
    assert "hint:" not in done.stderr


PYPROJECT_TEMPLATE = """[build-system]
requires = {requires}
build-backend = "setuptools.build_meta"

[project]
name = "spotguard"
version = "0.1.0"

[tool.setuptools.package-dir]
"spotguard.x" = "x"
"""


def test_the_build_does_not_depend_on_the_umask_or_the_checkouts_modes(tmp_path):
    """A checkout made under umask 002 (group-writable files) builds the same bytes."""
    previous = os.umask(0o002)
    try:
        source = _source_copy(tmp_path / "src")
        for folder in ("spotguard", "agent", "trainer_hooks", "fleet", "systemd"):
            shutil.copytree(
                REPO / folder,
                source / folder,
                ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".terraform*", "*.tfstate*"),
            )
        for path in [source, *source.rglob("*")]:
            path.chmod(0o775 if path.is_dir() else 0o664)
        wheel = BuiltWheel.build(tmp_path / "out", source)
    finally:
        os.umask(previous)
    assert wheel.sha256 == built_wheel().sha256
    with zipfile.ZipFile(wheel.path) as archive:
        modes = {
            (info.external_attr >> 16) & 0o777
            for info in archive.infolist()
            if not info.filename.endswith("/RECORD")  # written by the wheel tool as 0664 always
        }
    assert modes <= {0o644, 0o755}, sorted(oct(mode) for mode in modes)


def test_a_wheel_file_name_is_checked():
    with pytest.raises(ValueError, match="is not a spotguard wheel file"):
        BuiltWheel(Path("torch-2.0-py3-none-any.whl"), "0" * 64)


#: What the venvs in the sandbox may import besides what pip installs: this environment's
#: packages, except spotguard itself (so it can only come from the wheel).
def _dependencies(folder: Path) -> Path:
    site = Path(sysconfig.get_paths()["purelib"])
    folder.mkdir()
    for entry in site.iterdir():
        name = entry.name.lower()
        if name.startswith(("spotguard", "__editable__", "_spotguard")) or name.endswith(".pth"):
            continue
        (folder / entry.name).symlink_to(entry)
    return folder


REAL_PYTHON3 = r"""#!/bin/bash
echo "python3 $*" >> "$CALLS"
[ "$1 $2" = "-m venv" ] || exit 2
"$BASE_PYTHON" -m venv --without-pip "$3"
site=$("$3/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$DEPENDENCIES" > "$site/sandbox-dependencies.pth"
"""
#: `aws s3 cp URI FILE`, for real: boto3 against the moto server.
REAL_AWS = r"""#!/bin/bash
echo "aws $*" >> "$CALLS"
for last; do :; done
exec "$BASE_PYTHON_WITH_BOTO3" - "${@: -2:1}" "$last" <<'PY'
import sys, boto3
source, target = sys.argv[1], sys.argv[2]
bucket, key = source[len("s3://"):].split("/", 1)
boto3.client("s3").download_file(bucket, key, target)
PY
"""


def test_the_wheel_travels_from_package_to_bucket_to_node(
    terraform: Terraform, tmp_path_factory, moto_server, tmp_path
):
    wheel = built_wheel()
    work = basic_example_on_moto(tmp_path_factory.mktemp("wheel-apply"))
    with_wheel(work)
    variables = {
        "name": "wheel-e2e",
        "vpc_id": "vpc-00000000000000000",
        "subnet_ids": ["subnet-00000000000000000"],
        "ami_id": "ami-00000000000000000",
        "training_command": "python train.py",
        "allowed_account_ids": ["123456789012"],
    }
    (work / "test.auto.tfvars.json").write_text(json.dumps(variables))
    env = {
        "AWS_ENDPOINT_URL": moto_server,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    terraform("init", "-backend=false", cwd=work)
    # Only the upload and what it needs (the bucket): the full apply is test_moto_apply's.
    target = "-target=module.fleet.aws_s3_object.spotguard_wheel[0]"
    terraform("apply", "-auto-approve", target, cwd=work, env=env)

    key = f"spotguard/wheels/{wheel.sha256}/{wheel.path.name}"
    bucket = "wheel-e2e-ckpt-123456789012-us-east-1"
    s3 = boto3.client(
        "s3",
        endpoint_url=moto_server,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    assert hashlib.sha256(body).hexdigest() == wheel.sha256

    terraform("plan", "-out=plan.tfplan", cwd=work, env=env)
    plan = json.loads(terraform("show", "-json", "plan.tfplan", cwd=work, env=env).stdout)
    (module,) = plan["planned_values"]["root_module"]["child_modules"]
    template = next(r for r in module["resources"] if r["type"] == "aws_launch_template")
    script = base64.b64decode(template["values"]["user_data"]).decode()
    assert f"WHEEL_URI='s3://{bucket}/{key}'" in script

    from tests.fleet.test_user_data import STUBS, TOOLS

    bin_dir, tools, root = tmp_path / "bin", tmp_path / "tools", tmp_path / "root"
    for folder in (bin_dir, tools, root):
        folder.mkdir()
    for tool in TOOLS:
        (tools / tool).symlink_to(shutil.which(tool, path="/usr/bin:/bin") or tool)
    stubs = {**STUBS, "python3": REAL_PYTHON3, "aws": REAL_AWS}
    for name, text in stubs.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    base_python = shutil.which("python3", path="/usr/local/bin:/usr/bin") or sys.executable
    dependencies = _dependencies(tmp_path / "dependencies")
    # The training environment: a real venv too, made the same way.
    sandbox_env = {
        "PATH": f"{bin_dir}:{tools}",
        "HOME": str(tmp_path),
        "SANDBOX": str(tmp_path),
        "SPOTGUARD_ROOT": str(root),
        "CALLS": str(tmp_path / "calls.log"),
        "BASE_PYTHON": getattr(sys, "_base_executable", base_python),
        "BASE_PYTHON_WITH_BOTO3": sys.executable,
        "DEPENDENCIES": str(dependencies),
        # No package index at all: spotguard can come only from the wheel.
        "PIP_NO_INDEX": "1",
        "PIP_CONFIG_FILE": os.devnull,
        "PIP_FIND_LINKS": "",
        **{name: env[name] for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID")},
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    made = subprocess.run(
        [str(bin_dir / "python3"), "-m", "venv", str(root / "opt" / "pytorch")],
        env=sandbox_env,
        capture_output=True,
        text=True,
    )
    assert made.returncode == 0, made.stderr
    (tmp_path / "user-data.sh").write_text(script)
    done = subprocess.run(
        ["bash", str(tmp_path / "user-data.sh")],
        env=sandbox_env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr

    for python in (root / "opt/spotguard/venv/bin/python", root / "opt/pytorch/bin/python"):
        probe = subprocess.run(
            [str(python), "-c", PROBE],
            env={"PATH": "/usr/bin:/bin"},
            cwd=tmp_path,  # not the checkout: its spotguard.egg-info would be found first
            capture_output=True,
            text=True,
        )
        assert probe.returncode == 0, probe.stderr
        where, origin = probe.stdout.split()
        assert Path(where).is_relative_to(python.parents[1]), where  # in that venv, not the repo
        assert origin.endswith(f"/opt/spotguard/wheels/{wheel.sha256}/{wheel.path.name}")
    # The console script the units use is the installed one, and it works.
    units = root / "etc/systemd/system/spotguard-training@.service"
    assert units.read_bytes() == (REPO / "systemd/spotguard-training@.service").read_bytes()
    calls = (tmp_path / "calls.log").read_text()
    assert f"aws s3 cp --only-show-errors --region us-east-1 s3://{bucket}/{key}" in calls


#: Where spotguard is imported from, and the file pip installed it from.
PROBE = """
import importlib.metadata, json, spotguard
found = importlib.metadata.distribution("spotguard")
text = found.read_text("direct_url.json")
assert text, f"{found._path} has no direct_url.json"
url = json.loads(text)["url"]
print(spotguard.__file__, url)
"""
