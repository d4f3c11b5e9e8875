"""``spotguard fleet package``: the wheel of the spotguard being used, for the fleet's nodes.

The nodes install spotguard from the operator's own build, never by name from a package index
(DESIGN.md, "Fleet"): whoever registers the name there would get root on every node. This
builds that wheel from the source tree of the running spotguard (an editable install or a
checkout given with ``--source``), offline: ``pip wheel --no-build-isolation`` uses the build
backend already installed beside this interpreter instead of downloading one. The ``fleet``
extra brings it (``setuptools``, at the version ``[build-system]`` requires); it is checked
before the build, so a venv without it (Python 3.12 venvs have no setuptools) fails with one
line naming what to install, not with pip's traceback.

The build is reproducible (``SOURCE_DATE_EPOCH`` fixes the timestamps in the zip, and the
scratch copy's file modes are normalized to 0644/0755 whatever the umask or checkout), so the
same source gives the same SHA-256 and Terraform's content-addressed upload
(``spotguard/wheels/<sha256>/<file>``) does not change, nor the launch template, until the code
does. Older spotguard wheels in the destination are removed, so that it holds exactly the one
``examples/basic`` picks up.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from spotguard.errors import ConfigError, SpotguardError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = ["BuiltWheel"]

#: 1980-01-01, the earliest time a zip entry can hold: any fixed value makes builds repeatable.
SOURCE_DATE_EPOCH = "315532800"
#: What the distribution is built from (pyproject.toml's package-dir, plus its own files).
_SOURCE_FILES = ("pyproject.toml", "README.md", "LICENSE")
_IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", ".terraform*", "*.tfstate*", "*.tfplan")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _running_source() -> Path:
    """The checkout this spotguard is imported from (an editable install's tree)."""
    package = Path(str(resources.files("spotguard"))).resolve()
    root = package.parent
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file() or 'name = "spotguard"' not in pyproject.read_text():
        raise ConfigError(
            f"--source: spotguard is imported from {package}, not from a source checkout; "
            "give the checkout to build with --source DIR"
        )
    return root


_REQUIREMENT = re.compile(
    r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*(?:(>=|==)\s*([0-9][0-9.]*))?"
)


def _release(version: str) -> tuple[int, ...]:
    """The leading numeric release of a version (``68.2.0rc1`` -> (68, 2, 0))."""
    parts = []
    for part in version.split("."):
        digits = re.match(r"\d+", part)
        if digits is None:
            break
        parts.append(int(digits.group()))
        if digits.group() != part:
            break
    return tuple(parts)


def _missing_build_requirements(pyproject: Path) -> list[str]:
    """What ``[build-system]`` of ``pyproject`` needs that this interpreter's environment
    lacks (``pip wheel --no-build-isolation`` builds with it): ``["setuptools>=68 (not
    installed)"]``, or ``[]``."""
    try:
        system = tomllib.loads(pyproject.read_text()).get("build-system", {})
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--source: cannot read {pyproject}: {exc}") from None
    missing = []
    for requirement in system.get("requires", ["setuptools"]):
        parsed = _REQUIREMENT.match(requirement)
        if parsed is None:
            continue
        name, operator, wanted = parsed.groups()
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(f"{requirement} (not installed)")
            continue
        if wanted and (
            (operator == ">=" and _release(have) < _release(wanted))
            or (operator == "==" and _release(have) != _release(wanted))
        ):
            missing.append(f"{requirement} (found {have})")
    backend = str(system.get("build-backend", "setuptools.build_meta")).split(":")[0]
    if not missing and importlib.util.find_spec(backend.split(".")[0]) is None:
        missing.append(f"the build backend {backend} (not importable)")
    if importlib.util.find_spec("pip") is None:
        missing.append("pip (not installed)")
    return missing


_PIP_FRAMING = re.compile(r"^error: [a-z-]+$")


def _pip_error(output: str) -> str:
    """The line of pip's output that says what went wrong: the first ``error:`` line that is
    not pip's own framing (``error: subprocess-exited-with-error``), else the first
    ``error:`` line, else the last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line.lower()]
    for line in errors:
        if not _PIP_FRAMING.match(line.lower()):
            return line
    if errors:
        return errors[0]
    return lines[-1] if lines else "no output"


def _normalize_modes(tree: Path) -> None:
    """0755 for folders, 0644 for files: what goes into the wheel must not depend on the
    umask or the checkout (the SHA-256 is the upload's address)."""
    tree.chmod(0o755)
    for path in tree.rglob("*"):
        if path.is_symlink():
            continue
        path.chmod(0o755 if path.is_dir() else 0o644)


def _package_dirs(pyproject: Path) -> list[str]:
    """The folders pyproject.toml maps to import packages (spotguard, agent, ...)."""
    try:
        config = tomllib.loads(pyproject.read_text())
        mapping = config["tool"]["setuptools"]["package-dir"]
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(
            f"--source: {pyproject} has no tool.setuptools.package-dir ({exc})"
        ) from None
    return sorted({str(folder).split("/")[0] for folder in mapping.values()})


@dataclass(frozen=True)
class BuiltWheel:
    """A spotguard wheel on disk and its SHA-256 (the content address Terraform uploads to)."""

    path: Path
    sha256: str

    def __post_init__(self) -> None:
        if not self.path.name.startswith("spotguard-") or self.path.suffix != ".whl":
            raise ConfigError(f"wheel: {self.path.name!r} is not a spotguard wheel file")
        if len(self.sha256) != 64 or set(self.sha256) - set("0123456789abcdef"):
            raise ConfigError(f"sha256: {self.sha256!r} is not a hex SHA-256 digest")

    @classmethod
    def of(cls, path: Path) -> BuiltWheel:
        """The wheel at ``path``, hashed."""
        return cls(path.resolve(), _sha256(path))

    @classmethod
    def build(cls, dest: Path, source: Path | None = None) -> BuiltWheel:
        """Build the wheel of ``source`` (default: the running spotguard's checkout) into
        ``dest``; one line errors: :class:`ConfigError` for a bad source or destination,
        :class:`SpotguardError` when the build itself fails."""
        root = (source or _running_source()).resolve()
        pyproject = root / "pyproject.toml"
        if not pyproject.is_file():
            raise ConfigError(f"--source: {root} has no pyproject.toml")
        missing = _missing_build_requirements(pyproject)
        if missing:
            raise SpotguardError(
                f"building the wheel needs {', '.join(missing)} in {sys.executable}'s "
                "environment (no build backend is downloaded): install the fleet extra "
                "(pip install -e '.[fleet]') or pip install the requirement"
            )
        try:
            dest.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"--dest: cannot create {dest}: {exc.strerror}") from None
        with tempfile.TemporaryDirectory(prefix="spotguard-package-") as scratch:
            # A copy, so the build's egg-info and build/ never land in the checkout.
            tree, out = Path(scratch) / "src", Path(scratch) / "out"
            tree.mkdir()
            for name in _SOURCE_FILES:
                if (root / name).is_file():
                    shutil.copy2(root / name, tree / name)
            for folder in _package_dirs(pyproject):
                shutil.copytree(root / folder, tree / folder, ignore=_IGNORED)
            _normalize_modes(tree)
            done = subprocess.run(
                [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                 "--no-build-isolation", "--no-index", "--wheel-dir", str(out), str(tree)],
                capture_output=True,
                text=True,
                env=_build_env(),
                check=False,
                umask=0o022,  # the files the build writes itself (dist-info) too
            )  # fmt: skip
            if done.returncode != 0:
                why = _pip_error(f"{done.stdout}\n{done.stderr}")
                raise SpotguardError(f"building the wheel of {root} failed: {why}")
            (built,) = out.glob("spotguard-*.whl")
            for old in dest.glob("spotguard-*.whl"):
                if old.name != built.name:
                    old.unlink()
            target = dest / built.name
            shutil.move(str(built), target)
        return cls.of(target)


def _build_env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PIP_")}
    # No index, no user config: the build must not reach out for anything.
    env.update(SOURCE_DATE_EPOCH=SOURCE_DATE_EPOCH, PIP_CONFIG_FILE=os.devnull, PYTHONHASHSEED="0")
    return env
