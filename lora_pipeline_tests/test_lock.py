"""The lock files (scripts/lock.py, locks/): what a fresh clone installs is what was tested.

The promises: every place that installs has a lock of exact versions with hashes; the locks
agree with pyproject.toml, and a change to pyproject.toml that the locks do not follow fails
`make test` naming what changed; the images and the GPU bundle install from them.
"""

from __future__ import annotations

import copy
import importlib.util
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("lock", REPO / "scripts" / "lock.py")
lock = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("lock", lock)
_spec.loader.exec_module(lock)

EXACT = ("torch", "diffusers", "transformers", "peft", "huggingface-hub", "dagster")


def test_the_committed_locks_agree_with_pyproject() -> None:
    assert lock.check(lock.pyproject()) == []


@pytest.mark.parametrize("name", ["cpu", "worker", "gpu-bundle"])
def test_each_training_lock_pins_the_stack_exactly_with_hashes(name: str) -> None:
    locked = lock.read_lock(name)
    for package in EXACT:
        assert re.fullmatch(r"\d+(\.\d+)*(\+cpu)?", locked.versions[package]), (package, locked.versions[package])
        assert locked.hashes[package], package
    assert all(locked.hashes.values())


def test_cpu_machines_get_a_cpu_torch_and_the_worker_image_the_cuda_build() -> None:
    cpu, worker = lock.read_lock("cpu"), lock.read_lock("worker")
    assert cpu.versions["torch"] == f"{lock.TORCH}+cpu"
    assert not any(name.startswith("nvidia-") for name in cpu.versions)  # no CUDA libraries on CPU machines
    assert worker.versions["torch"] == lock.TORCH
    assert any(name.startswith("nvidia-") for name in worker.versions)  # CUDA's libraries come with it


def test_packages_shared_by_two_locks_have_one_version() -> None:
    cpu = lock.read_lock("cpu").versions
    for name in ("worker", "deploy", "gpu-bundle"):
        other = lock.read_lock(name).versions
        differ = {p: (cpu[p], other[p]) for p in set(cpu) & set(other) if p != "torch" and cpu[p] != other[p]}
        assert differ == {}, name


def test_a_new_dependency_the_lock_lacks_is_named() -> None:
    project = copy.deepcopy(lock.pyproject())
    project["dependencies"].append("polars>=1")
    problems = lock.check(project, ("cpu",))
    assert "locks/cpu.txt: pyproject.toml asks for polars>=1: not in the lock" in problems
    assert "locks/cpu.txt was made from another pyproject.toml (its fingerprint differs)" in problems


def test_a_range_that_excludes_the_locked_version_is_named() -> None:
    project = copy.deepcopy(lock.pyproject())
    locked = lock.read_lock("cpu").versions["diffusers"]
    project["optional-dependencies"]["train"] = [
        f"diffusers>{locked}" if r.startswith("diffusers") else r for r in project["optional-dependencies"]["train"]
    ]
    problems = lock.check(project, ("cpu", "deploy"))
    assert f"locks/cpu.txt: pyproject.toml asks for diffusers>{locked}: the lock has {locked}" in problems
    assert not any(p.startswith("locks/deploy.txt") for p in problems)  # the deploy lock has no `train`


def test_any_other_change_to_what_a_lock_is_made_from_changes_its_fingerprint() -> None:
    project = copy.deepcopy(lock.pyproject())
    project["optional-dependencies"]["dev"].append("pytest>=1")  # satisfied, but not what was locked
    assert lock.check(project, ("cpu",)) == [
        "locks/cpu.txt was made from another pyproject.toml (its fingerprint differs)"
    ]
    project = copy.deepcopy(lock.pyproject())
    project["build-requires"] = ["setuptools>=999"]
    assert "locks/cpu.txt: pyproject.toml asks for setuptools>=999: the lock has" in " ".join(
        lock.check(project, ("cpu",))
    )


def test_a_lock_edited_by_hand_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = lock.BY_NAME["deploy"].path.read_text()
    target = tmp_path / "locks"
    target.mkdir()
    # A hash removed and the pin of a required package dropped.
    edited = re.sub(r"(^boto3==\S+ \\\n)(\s+--hash=\S+ \\\n)+(\s+--hash=\S+\n)", r"boto3==1.40.0\n", text, flags=re.M)
    edited = re.sub(r"^click==.*?(?=^\S)", "", edited, flags=re.M | re.S)
    (target / "deploy.txt").write_text(edited)
    monkeypatch.setattr(lock, "LOCKS", target)
    problems = lock.check(lock.pyproject(), ("deploy",))
    assert any("click>=8.1: not in the lock" in p for p in problems)
    assert any("no hashes for ['boto3']" in p for p in problems)


def test_the_parser_reads_versions_hashes_and_who_requires_what() -> None:
    locked = lock.parse_lock(
        "# input-sha256: f00\n"
        "a-pkg==1.0 \\\n    --hash=sha256:" + "1" * 64 + " \\\n    --hash=sha256:" + "2" * 64 + "\n"
        "    # via lora-pipeline (pyproject.toml)\n"
        "b_pkg==2.0+cpu \\\n    --hash=sha256:"
        + "3" * 64
        + "\n    # via\n    #   a-pkg\n    #   lora-pipeline (build-system)\n"
    )
    assert locked.versions == {"a-pkg": "1.0", "b-pkg": "2.0+cpu"}
    assert len(locked.hashes["a-pkg"]) == 2 and locked.fingerprint == "f00"
    assert locked.required_by["b-pkg"] == {"a-pkg", "lora-pipeline"}
    assert locked.requires()["a-pkg"] == {"b-pkg"}


def test_an_interpreter_that_differs_from_the_lock_is_named() -> None:
    installed = lock.installed_versions()
    installed.pop("lora-pipeline", None)
    installed.pop("pip", None)
    exact = lock.Locked(installed, {}, {}, None)
    assert lock.check_installed(exact) == []
    other = dict(installed, pytest="0.0.1", **{"not-installed-here": "1.0"})
    del other["pluggy"]
    problems = lock.check_installed(lock.Locked(other, {}, {}, None))
    assert f"pytest: installed {installed['pytest']}, locked 0.0.1" in problems
    assert "not-installed-here: installed nothing, locked 1.0" in problems
    assert f"pluggy {installed['pluggy']}: installed, not in the lock" in problems


@pytest.mark.parametrize(
    ("dockerfile", "lock_file"),
    [("Dockerfile", "locks/worker.txt"), ("deploy/Dockerfile", "locks/deploy.txt")],
)
def test_the_images_install_their_lock_with_hashes_and_nothing_else(dockerfile: str, lock_file: str) -> None:
    text = (REPO / dockerfile).read_text()
    installs = [line for line in text.splitlines() if "pip install" in line and not line.lstrip().startswith("#")]
    assert installs and all("--no-deps" in line for line in installs), installs
    assert any("--require-hashes" in line for line in installs)
    assert lock_file in text
