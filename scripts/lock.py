"""The lock files: the exact versions, with hashes, that every place the project installs gets.

pyproject.toml keeps ranges (what the code supports); ``locks/`` keeps one tested set of
exact versions per place that installs, so that a fresh clone next month installs what
was tested today, not whatever the ranges resolve to then:

==================  =====================  ==========================================
lock                extras                 installed by
==================  =====================  ==========================================
locks/cpu.txt       train, dev, deploy     ``make install`` (so ``make dev``, ``make test``, CI),
                                           CPU torch; the ``make deploy-test`` image
locks/worker.txt    train, qlora           the RunPod worker image (Dockerfile), CUDA torch,
                                           bitsandbytes (nf4 base, 8-bit Adam)
locks/deploy.txt    deploy                 the Dagster image (deploy/Dockerfile)
locks/gpu-bundle.txt train, reference      ``make gpu-bundle``: CPython 3.12, what the GPU
                                           machine lacks is carried at these versions
locks/uv.txt        (uv alone)             ``make install``'s bootstrap of uv into the venv
==================  =====================  ==========================================

``uv pip compile`` resolves (uv: a resolver and installer, much faster than pip, with
hashes and cross-platform targets); the CPU lock first, then the others constrained
by it, so a package shared by two locks has one version in both. Every lock records
a fingerprint of what it was made from; ``check`` (run by ``make test``) fails when
pyproject.toml changed since, naming what changed.

    python scripts/lock.py compile              # make lock: re-resolve every lock (newest allowed)
    python scripts/lock.py check [--installed]  # make test: locks match pyproject (and this venv matches cpu.txt)
    python scripts/lock.py drift                # make test-latest: what differs from cpu.txt here
    python scripts/lock.py pins LOCK            # name==version per line (for scripts)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCKS = REPO / "locks"
# The one torch release every lock carries (pyproject's range admits more): a CPU build on CPU
# machines (a local wheel folder here, PyTorch's CPU index elsewhere), PyPI's CUDA build in the
# worker image.
TORCH = "2.13.0"
PLATFORM = "x86_64-manylinux_2_28"
FINGERPRINT = "# input-sha256: "
# Where uv finds the CPU torch wheel while locking: this machine's local wheel folder.
TORCH_WHEELS = Path(os.environ.get("LORA_TORCH_WHEELS", "/opt/wheels"))


@dataclass(frozen=True)
class Lock:
    """One lock file: which extras, for which Python, with which torch build."""

    name: str
    extras: tuple[str, ...]
    python: str
    torch: str | None  # the exact torch pin, or None where the extras need no torch
    purpose: str
    constrained_by_cpu: bool = True

    @property
    def path(self) -> Path:
        return LOCKS / f"{self.name}.txt"


TARGETS = (
    Lock("cpu", ("train", "dev", "deploy"), "3.11", f"{TORCH}+cpu", "make install: this machine, the tests, CI", False),
    Lock("worker", ("train", "qlora"), "3.11", TORCH, "the RunPod worker image (Dockerfile), CUDA torch"),
    Lock("deploy", ("deploy",), "3.11", None, "the Dagster image (deploy/Dockerfile)"),
    Lock("gpu-bundle", ("train", "reference"), "3.12", TORCH, "make gpu-bundle: the GPU machine's CPython 3.12"),
)
BY_NAME = {lock.name: lock for lock in TARGETS}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# --------------------------------------------------------------------------- reading a lock


@dataclass(frozen=True)
class Locked:
    """A parsed lock: each package's version, hashes and who requires it (uv's ``# via``)."""

    versions: dict[str, str]
    hashes: dict[str, tuple[str, ...]]
    required_by: dict[str, frozenset[str]]
    fingerprint: str | None

    def requires(self) -> dict[str, set[str]]:
        """The forward graph: package -> the locked packages it requires."""
        graph: dict[str, set[str]] = {name: set() for name in self.versions}
        for child, parents in self.required_by.items():
            for parent in parents:
                if parent in graph:
                    graph[parent].add(child)
        return graph


_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)")
_HASH = re.compile(r"--hash=(sha256:[0-9a-f]{64})")


def parse_lock(text: str) -> Locked:
    """Read uv's requirements output (``--generate-hashes``, the default ``# via`` annotations)."""
    versions: dict[str, str] = {}
    hashes: dict[str, list[str]] = {}
    required_by: dict[str, set[str]] = {}
    fingerprint = None
    current: str | None = None
    in_via = False
    for line in text.splitlines():
        stripped = line.strip()
        if line.startswith(FINGERPRINT):
            fingerprint = line[len(FINGERPRINT) :].strip()
            continue
        match = _PIN.match(line)
        if match:
            current = normalize(match.group(1))
            versions[current] = match.group(2)
            hashes[current] = []
            required_by[current] = set()
            in_via = False
        if current is None:
            continue
        hashes[current] += _HASH.findall(line)
        if stripped.startswith("# via"):
            rest = stripped[len("# via") :].strip()
            in_via = not rest
            if rest:
                required_by[current].add(_via_name(rest))
        elif in_via and stripped.startswith("#   "):
            required_by[current].add(_via_name(stripped[4:]))
        elif not stripped.startswith("--hash"):
            in_via = False
    return Locked(
        versions,
        {k: tuple(v) for k, v in hashes.items()},
        {k: frozenset(v) for k, v in required_by.items()},
        fingerprint,
    )


def _via_name(text: str) -> str:
    """``lora-pipeline (pyproject.toml)`` -> ``lora-pipeline``; ``-c constraints`` stays a marker."""
    return normalize(text.split(" (", 1)[0].strip())


def read_lock(name: str) -> Locked:
    path = BY_NAME[name].path
    if not path.is_file():
        raise SystemExit(f"{path.relative_to(REPO)} is missing: run `make lock`")
    return parse_lock(path.read_text())


# --------------------------------------------------------------------------- what a lock is made from


def pyproject(path: Path = REPO / "pyproject.toml") -> dict:
    """The [project] table, with the build backend's requirements under ``build-requires``."""
    data = tomllib.loads(path.read_text())
    return data["project"] | {"build-requires": data.get("build-system", {}).get("requires", [])}


def requirements_for(project: dict, extras: tuple[str, ...]) -> list[str]:
    """The requirement strings a lock must satisfy: the build backend (installs build the project
    with --no-build-isolation, so it too is locked), the core dependencies and each extra's."""
    optional = project.get("optional-dependencies", {})
    unknown = [extra for extra in extras if extra not in optional]
    if unknown:
        raise SystemExit(f"pyproject.toml has no extra {unknown} (known: {sorted(optional)})")
    out = list(project.get("build-requires", [])) + list(project.get("dependencies", []))
    for extra in extras:
        out += optional[extra]
    return out


def fingerprint(project: dict, lock: Lock) -> str:
    """What the lock was resolved from: its requirements, Python, platform and torch build."""
    source = {
        "requirements": requirements_for(project, lock.extras),
        "requires-python": project.get("requires-python"),
        "python": lock.python,
        "platform": PLATFORM,
        "torch": lock.torch,
    }
    return hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()


def unmet(requirements: list[str], locked: Locked, python: str) -> list[str]:
    """Requirements the locked versions do not satisfy (missing, or outside the range)."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    environment = {"python_version": python, "python_full_version": f"{python}.0", "sys_platform": "linux"}
    problems = []
    for text in requirements:
        requirement = Requirement(text)
        if requirement.marker and not requirement.marker.evaluate(environment | {"extra": ""}):
            continue
        name = normalize(requirement.name)
        if name not in locked.versions:
            problems.append(f"{text}: not in the lock")
        elif not requirement.specifier.contains(Version(locked.versions[name]), prereleases=True):
            problems.append(f"{text}: the lock has {locked.versions[name]}")
    return problems


def check(project: dict, names: tuple[str, ...] = tuple(BY_NAME)) -> list[str]:
    """Every way the locks disagree with pyproject.toml, as sentences; empty when they agree."""
    problems = []
    for name in names:
        lock = BY_NAME[name]
        relative = f"locks/{lock.path.name}"
        if not lock.path.is_file():
            problems.append(f"{relative} is missing")
            continue
        locked = parse_lock(lock.path.read_text())
        for problem in unmet(requirements_for(project, lock.extras), locked, lock.python):
            problems.append(f"{relative}: pyproject.toml asks for {problem}")
        if lock.torch and locked.versions.get("torch") != lock.torch:
            problems.append(f"{relative}: torch {locked.versions.get('torch')}, wanted {lock.torch}")
        missing_hashes = sorted(n for n, h in locked.hashes.items() if not h)
        if missing_hashes:
            problems.append(f"{relative}: no hashes for {missing_hashes}")
        if locked.fingerprint != fingerprint(project, lock):
            problems.append(f"{relative} was made from another pyproject.toml (its fingerprint differs)")
    return problems


def installed_versions() -> dict[str, str]:
    """This interpreter's distributions, name (normalized) -> version."""
    from importlib import metadata

    return {normalize(d.metadata["Name"]): d.version for d in metadata.distributions()}


def check_installed(locked: Locked) -> list[str]:
    """Differences between this interpreter's distributions and the lock (the project itself aside)."""
    installed = installed_versions()
    for own in ("lora-pipeline", "pip"):  # the project itself (editable); the venv's own installer
        installed.pop(own, None)
    problems = [
        f"{name}: installed {installed.get(name, 'nothing')}, locked {version}"
        for name, version in sorted(locked.versions.items())
        if installed.get(name) != version
    ]
    problems += [
        f"{name} {version}: installed, not in the lock"
        for name, version in sorted(installed.items())
        if name not in locked.versions
    ]
    return problems


# --------------------------------------------------------------------------- resolving


def uv() -> str:
    found = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    if not found:
        raise SystemExit("uv is not installed: `make install` puts it in .venv")
    return found


def compile_lock(lock: Lock, constraints: Path | None, upgrade: bool) -> None:
    """Resolve one lock with uv and stamp it with its fingerprint."""
    command = [
        uv(),
        "pip",
        "compile",
        "pyproject.toml",
        "build-requires.txt",
        *[f"--extra={extra}" for extra in lock.extras],
        "--generate-hashes",
        "--python-version",
        lock.python,
        "--python-platform",
        PLATFORM,
        "--custom-compile-command",
        "make lock",
        "--no-header",
        "--quiet",
        "-o",
        str(lock.path),
    ]
    if upgrade:
        command.append("--upgrade")  # else uv keeps the versions already in the output file where they fit
    pins = []
    if lock.torch:
        pins.append(f"torch=={lock.torch}")
        if lock.torch.endswith("+cpu"):
            if not any(TORCH_WHEELS.glob(f"torch-{lock.torch}-*.whl")):
                raise SystemExit(f"no torch-{lock.torch} wheel in {TORCH_WHEELS} (set LORA_TORCH_WHEELS)")
            command += ["--find-links", str(TORCH_WHEELS), "--no-emit-find-links"]
    with tempfile.TemporaryDirectory() as tmp:
        build = Path(tmp) / "build-requires.txt"
        build.write_text("".join(f"{r}\n" for r in pyproject()["build-requires"]))
        command[command.index("build-requires.txt")] = str(build)
        torch_file = Path(tmp) / "torch.txt"
        torch_file.write_text("\n".join(pins) + "\n")
        command += ["--constraint", str(torch_file)]
        if constraints is not None:
            command += ["--constraint", str(constraints)]
        subprocess.run(command, cwd=REPO, check=True)
    body = lock.path.read_text()
    body = re.sub(r"^\s*#\s+-c .*\n", "", body, flags=re.M)  # the temporary constraint files' names
    body = re.sub(r"-r \S*build-requires\.txt", "lora-pipeline (build-system)", body)
    body = re.sub(r"^(\s*# via)\n(?!\s*#   )", r"\1 (constraint)\n", body, flags=re.M)
    header = [
        f"# {lock.path.relative_to(REPO)}: {lock.purpose}.",
        f"# Extras {', '.join(lock.extras)}; CPython {lock.python}, {PLATFORM}. Made by `make lock` (scripts/lock.py):",
        "# edit pyproject.toml, never this file.",
        f"{FINGERPRINT}{fingerprint(pyproject(), lock)}",
    ]
    lock.path.write_text("\n".join(header) + "\n" + body)


def cpu_constraints(tmp: Path) -> Path:
    """The CPU lock's pins, torch aside (each lock chooses its own torch build)."""
    locked = read_lock("cpu")
    path = tmp / "cpu-pins.txt"
    path.write_text("".join(f"{n}=={v}\n" for n, v in sorted(locked.versions.items()) if n != "torch"))
    return path


def write_uv_bootstrap() -> None:
    """locks/uv.txt: uv's own pin and hashes, for `pip install --require-hashes` before uv exists."""
    locked = read_lock("cpu")
    if "uv" not in locked.versions:
        raise SystemExit("locks/cpu.txt has no uv: the dev extra must name it")
    lines = [f"uv=={locked.versions['uv']} \\"] + [f"    --hash={h} \\" for h in locked.hashes["uv"]]
    lines[-1] = lines[-1].removesuffix(" \\")
    (LOCKS / "uv.txt").write_text(
        "# locks/uv.txt: uv for make install's bootstrap (from locks/cpu.txt by make lock).\n" + "\n".join(lines) + "\n"
    )


def compile_all(upgrade: bool) -> None:
    LOCKS.mkdir(exist_ok=True)
    compile_lock(BY_NAME["cpu"], None, upgrade)
    with tempfile.TemporaryDirectory() as tmp:
        pins = cpu_constraints(Path(tmp))
        for lock in TARGETS:
            if lock.constrained_by_cpu:
                compile_lock(lock, pins, upgrade=True)
    write_uv_bootstrap()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("compile", help="re-resolve every lock from pyproject.toml")
    make.add_argument("--keep", action="store_true", help="keep the CPU lock's versions where they still fit")
    checking = sub.add_parser("check", help="fail when a lock disagrees with pyproject.toml")
    checking.add_argument("--installed", action="store_true", help="also compare this interpreter with locks/cpu.txt")
    sub.add_parser("drift", help="list where this interpreter differs from locks/cpu.txt (make test-latest)")
    pins = sub.add_parser("pins", help="print a lock's name==version lines")
    pins.add_argument("lock", choices=sorted(BY_NAME))
    args = parser.parse_args(argv)
    if args.command == "compile":
        compile_all(upgrade=not args.keep)
        print(f"locks written: {', '.join(str(lock.path.relative_to(REPO)) for lock in TARGETS)}, locks/uv.txt")
        return 0
    if args.command == "pins":
        print("\n".join(f"{n}=={v}" for n, v in sorted(read_lock(args.lock).versions.items())))
        return 0
    if args.command == "drift":
        drift = check_installed(read_lock("cpu"))
        print(f"{sys.prefix} against locks/cpu.txt: " + ("\n  ".join(["", *drift]) if drift else "the same versions"))
        return 0
    problems = check(pyproject())
    if problems:
        print("The locks disagree with pyproject.toml; `make lock` re-resolves them:", file=sys.stderr)
        print("\n".join(f"  {p}" for p in problems), file=sys.stderr)
        return 1
    if args.installed:
        drift = check_installed(read_lock("cpu"))
        if drift:
            print(f"{sys.prefix} differs from locks/cpu.txt; `make install` syncs it:", file=sys.stderr)
            print("\n".join(f"  {p}" for p in drift), file=sys.stderr)
            return 1
    print(f"locks agree with pyproject.toml ({', '.join(lock.name for lock in TARGETS)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
