"""What the GPU run needs that a bare GPU machine lacks, gathered into ``.gpu_bundle/``.

The GPU machine has no network and starts bare each time; its Python (3.12,
manylinux x86_64) has torch, transformers, peft, accelerate, safetensors,
torchvision and tensorboard, but not diffusers. ``make gpu-bundle`` runs this
script, which puts beside the checkout, in the ignored folder ``.gpu_bundle/``:

* ``wheels/``: every missing package as a wheel for that Python (``pip download
  --only-binary=:all: --python-version 3.12 --platform manylinux…``), one version of
  each, pinned below;
* ``reference/``: each family's diffusers script (``bench_families.TABLE``:
  ``train_text_to_image_lora.py``, ``train_dreambooth_lora_{sdxl,flux,sd3,flux2_klein,
  z_image,qwen_image}.py``), copied from a local diffusers source snapshot
  (never from git over the network). The diffusers sdist on PyPI ships no
  ``examples/`` (checked for 0.42.1), so the snapshot is a diffusers source tree
  (an unpacked release archive) or a local git mirror of it, named by
  ``DIFFUSERS_SRC`` (and ``DIFFUSERS_REF`` for a git mirror);
* ``manifest.json``: versions, where the scripts came from and their sha256.

It then prints the one command to run on the GPU machine. Re-running it reuses
wheels already downloaded.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import re
import subprocess
import sys
import zipfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / ".gpu_bundle"
if str(REPO / "scripts") not in sys.path:
    sys.path.insert(0, str(REPO / "scripts"))
import lock as locks  # noqa: E402 - scripts/lock.py: the lock files and their dependency graphs
from lock import normalize  # noqa: E402 - one spelling of a distribution's name, the lock's

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_families as families  # noqa: E402 - the families' table names the reference scripts

# Each family's reference script (bench_families.TABLE), by its file name in reference/.
REFERENCE_SCRIPTS = {Path(e.reference_script).name: e.reference_script for e in families.TABLE.values()}

# What the GPU side imports, as roots in locks/gpu-bundle.txt: the `train` extra (but runpod: the
# benchmark calls the trainer, not the serverless loop), the core packages lora_pipeline.worker and
# the sample's ingest import, and the `reference` extra (what the reference scripts import).
# Everything they require is found in the lock, never listed here.
NOT_ON_GPU = {"runpod": "the serverless loop; the benchmark calls train_lora directly"}
CORE_ROOTS = ("pydantic", "pydantic-settings", "tenacity")
# Packages the GPU machine has that are carried all the same, at the lock's version.
CARRY_ANYWAY = {"typing-extensions": "the machine's is older than pydantic-core needs"}
# Versions on the GPU machine, where the workplace's device notes give them (2026-11): a carried
# wheel that needs another version of one of these is named by unmet_requirements.
DEVICE_VERSIONS = {
    "accelerate": "1.15.0",
    "huggingface-hub": "1.33.0",
    "numpy": "2.5.2",
    "safetensors": "0.8.0",
    "tokenizers": "0.23.2",
    "torch": "2.11.0",
    "transformers": "5.17.0",
}

# The GPU machine's Python packages, as the workplace's device notes list them
# (image 'cuda', read 2026-11-17). The dry run checks every distribution our code
# and the reference scripts import against this list plus what the bundle carries.
DEVICE_PACKAGES = frozenset(
    """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt
jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx
onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client
propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions
pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl
tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics
torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop
wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split()
)

LOCAL_DEPS_DIR = Path(os.environ.get("LORA_PIPELINE_CACHE") or Path.home() / ".cache" / "lora_pipeline") / (
    f"reference-deps-cp{sys.version_info.major}{sys.version_info.minor}"
)

PLATFORMS = [
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
]
DEVICE_COMMAND = "bash benchmarks/gpu/run_on_gpu.sh"
# pip without this machine's configuration: its local index folders hold no such wheels and only warn.
QUIET_PIP = dict(os.environ, PIP_CONFIG_FILE=os.devnull)


def gpu_roots() -> list[str]:
    """The packages the GPU side imports directly (see NOT_ON_GPU and CORE_ROOTS)."""
    names = extra_names("train") + extra_names("reference")
    return [name for name in names if name not in NOT_ON_GPU] + list(CORE_ROOTS)


def extra_names(extra: str) -> list[str]:
    """The distributions pyproject's ``extra`` names, normalized."""
    from packaging.requirements import Requirement

    return [normalize(Requirement(text).name) for text in locks.pyproject()["optional-dependencies"][extra]]


def closure(locked: locks.Locked, roots: list[str], stop: Callable[[str], bool]) -> dict[str, str]:
    """``roots`` and everything they require in ``locked``, not descending into what ``stop`` names."""
    graph = locked.requires()
    found: dict[str, str] = {}
    pending = [normalize(name) for name in roots]
    while pending:
        name = pending.pop()
        if name in found or name not in locked.versions or stop(name):
            continue
        found[name] = locked.versions[name]
        pending += sorted(graph[name])
    return found


def on_device(name: str) -> bool:
    return name in DEVICE_PACKAGES and name not in CARRY_ANYWAY


def carried_wheels(locked: locks.Locked | None = None) -> dict[str, str]:
    """What the bundle carries, name -> version: the GPU side's packages and what they require,
    from locks/gpu-bundle.txt, less what the GPU machine has (it keeps its own versions)."""
    return closure(locked or locks.read_lock("gpu-bundle"), gpu_roots(), on_device)


def diffusers_version() -> str:
    return carried_wheels()["diffusers"]


def available_on_device(cpu_lock: locks.Locked | None = None) -> frozenset[str]:
    """Every distribution the GPU run may import there: the machine's, the carried ones, and what
    this machine's versions of the machine's packages require here (transformers' ``kernels``,
    say: on the GPU machine its own transformers decides)."""
    cpu_lock = cpu_lock or locks.read_lock("cpu")
    present = [name for name in cpu_lock.versions if name in DEVICE_PACKAGES]
    with_device_packages = closure(cpu_lock, present, lambda name: False)
    return DEVICE_PACKAGES | set(carried_wheels()) | set(with_device_packages)


def local_reference_deps() -> dict[str, str]:
    """For the dry run of the reference on this machine (its own Python, not 3.12): what the
    `reference` extra needs that this interpreter lacks, at the bundle lock's versions."""
    installed = locks.installed_versions()
    return closure(locks.read_lock("gpu-bundle"), extra_names("reference"), lambda name: name in installed)


# --------------------------------------------------------------------------- reference scripts


def read_reference_sources(source: Path, ref: str | None) -> dict[str, bytes]:
    """The reference scripts from a diffusers source tree, or from a local git mirror at ``ref``.

    Local only: a git mirror is read with ``git show``, never fetched.
    """
    source = Path(source).expanduser()
    files: dict[str, bytes] = {}
    if (source / "examples").is_dir():
        for name, relative in REFERENCE_SCRIPTS.items():
            path = source / relative
            if not path.is_file():
                raise SystemExit(f"{source} has examples/ but not {relative}")
            files[name] = path.read_bytes()
        return files
    git_dir = source / ".git" if (source / ".git").exists() else source
    if not (git_dir / "HEAD").is_file():
        raise SystemExit(
            f"DIFFUSERS_SRC={source} is neither a diffusers source tree (with examples/) nor a git mirror of one"
        )
    for name, relative in REFERENCE_SCRIPTS.items():
        done = subprocess.run(
            ["git", f"--git-dir={git_dir}", "show", f"{ref or 'HEAD'}:{relative}"], capture_output=True
        )
        if done.returncode != 0:
            raise SystemExit(f"{git_dir} has no {relative} at {ref or 'HEAD'}: {done.stderr.decode().strip()}")
        files[name] = done.stdout
    return files


def min_diffusers_version(script: str) -> str | None:
    """The version a script asks for with ``check_min_version``."""
    match = re.search(r'check_min_version\("([^"]+)"\)', script)
    return match.group(1) if match else None


def check_reference_scripts(files: dict[str, bytes], carried: str | None = None) -> None:
    """Refuse scripts the carried diffusers cannot run (their ``check_min_version``)."""
    from packaging.version import Version

    carried = carried or diffusers_version()
    for name, data in files.items():
        wanted = min_diffusers_version(data.decode())
        if wanted and Version(wanted) > Version(carried):
            raise SystemExit(
                f"{name} needs diffusers >= {wanted}, the bundle carries {carried}: "
                "take the scripts from an older diffusers snapshot (DIFFUSERS_REF=v<version>)"
            )


def script_flags(path: Path) -> set[str]:
    """Every ``--option`` a script's argparse defines, read from its source (nothing imported)."""
    tree = ast.parse(Path(path).read_text())
    flags = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            for arg in node.args:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith("--"):
                    flags.add(arg.value)
    return flags


def unknown_flags(path: Path, argv: list[str]) -> list[str]:
    """The options in ``argv`` that the script does not define."""
    known = script_flags(path)
    used = [item.split("=", 1)[0] for item in argv if item.startswith("--")]
    return [flag for flag in used if flag not in known]


# --------------------------------------------------------------------------- wheels


def download_wheels(dest: Path, python: str = sys.executable) -> list[Path]:
    """Each carried wheel for CPython 3.12 manylinux x86_64, no dependencies pulled in (the lock
    already holds them), checked against the lock's hashes."""
    dest.mkdir(parents=True, exist_ok=True)
    wanted = carried_wheels()
    for stale in dest.glob("*.whl"):
        name, version = _wheel_name_version(stale)
        if wanted.get(name) != version:
            stale.unlink()  # one version of each: two stop the install on the machine
    missing = [
        f"{name}=={version}"
        for name, version in wanted.items()
        if not any(_wheel_name_version(p) == (name, version) for p in dest.glob("*.whl"))
    ]
    if missing:
        command = [
            python,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            "3.12",
            "--implementation",
            "cp",
            "--dest",
            str(dest),
        ]
        for platform in PLATFORMS:
            command += ["--platform", platform]
        subprocess.run(command + missing, check=True, env=QUIET_PIP)
    wheels = sorted(dest.glob("*.whl"))
    found = {_wheel_name_version(p) for p in wheels}
    absent = [f"{n}=={v}" for n, v in wanted.items() if (n, v) not in found]
    if absent:
        raise SystemExit(f"pip left no wheel for {absent} in {dest}")
    hashes = locks.read_lock("gpu-bundle").hashes
    for wheel in wheels:
        name = _wheel_name_version(wheel)[0]
        if f"sha256:{sha256(wheel.read_bytes())}" not in hashes.get(name, ()):
            wheel.unlink()
            raise SystemExit(f"{wheel.name}: its sha256 is not among locks/gpu-bundle.txt's hashes for {name}")
    return wheels


DEVICE_MARKERS = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "extra": "",
}


def unmet_requirements(wheels: list[Path]) -> list[str]:
    """Requirements of the carried wheels (on the GPU machine's Python) that neither the
    machine nor the bundle provides, or that a known machine version does not meet:
    ``--no-deps`` installs would not notice them."""
    from packaging.requirements import Requirement

    carried = carried_wheels()
    available = DEVICE_PACKAGES | set(carried)
    unmet = []
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            meta = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
            lines = archive.read(meta).decode().splitlines()
        for line in lines:
            if not line.startswith("Requires-Dist:"):
                continue
            requirement = Requirement(line.split(":", 1)[1].strip())
            if requirement.marker and not requirement.marker.evaluate(DEVICE_MARKERS):
                continue
            name = normalize(requirement.name)
            if name not in available:
                unmet.append(f"{wheel.name} needs {requirement}")
            elif name not in carried and name in DEVICE_VERSIONS:
                if not requirement.specifier.contains(DEVICE_VERSIONS[name], prereleases=True):
                    unmet.append(f"{wheel.name} needs {requirement}, the machine has {DEVICE_VERSIONS[name]}")
    return unmet


def _wheel_name_version(path: Path) -> tuple[str, str]:
    name, version = path.name.split("-")[:2]
    return normalize(name), version


def install_local_reference_deps(target: Path = LOCAL_DEPS_DIR) -> Path:
    """The reference's extra packages for this machine's Python, once, in a cache folder."""
    marker = target / ".installed.json"
    wanted = local_reference_deps()
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        return target
    pins = [f"{name}=={version}" for name, version in wanted.items()]
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--upgrade", "--target", str(target), *pins],
        check=True,
        env=QUIET_PIP,
    )
    marker.write_text(json.dumps(wanted))
    return target


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- main


def build(bundle: Path, source: Path, ref: str | None, *, wheels: bool = True) -> dict:
    files = read_reference_sources(source, ref)
    check_reference_scripts(files)
    reference = bundle / "reference"
    reference.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (reference / name).write_bytes(data)
    wheel_files = download_wheels(bundle / "wheels") if wheels else sorted((bundle / "wheels").glob("*.whl"))
    unmet = unmet_requirements(wheel_files)
    if unmet:
        raise SystemExit(
            "the GPU machine would lack what these carried wheels need (see CARRY_ANYWAY, DEVICE_VERSIONS):\n  "
            + "\n  ".join(unmet)
        )
    manifest = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "diffusers": diffusers_version(),
        "reference_source": {"path": str(source), "ref": ref, "commit": _commit(source, ref)},
        "reference_scripts": {
            name: {
                "sha256": sha256(data),
                "from": REFERENCE_SCRIPTS[name],
                "min_diffusers": min_diffusers_version(data.decode()),
            }
            for name, data in files.items()
        },
        "wheels": [p.name for p in wheel_files],
        "python": "cp312 manylinux x86_64",
        "command": DEVICE_COMMAND,
    }
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _commit(source: Path, ref: str | None) -> str | None:
    git_dir = source / ".git" if (source / ".git").exists() else source
    if not (git_dir / "HEAD").is_file():
        return None
    done = subprocess.run(
        ["git", f"--git-dir={git_dir}", "rev-parse", f"{ref or 'HEAD'}^{{commit}}"], capture_output=True, text=True
    )
    return done.stdout.strip() or None


def size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def instructions(bundle: Path) -> str:
    relative = os.path.relpath(bundle, REPO)
    return "\n".join(
        [
            f"GPU bundle ready: {relative}/ ({size_mb(bundle):.1f} MiB), ignored by git.",
            "On the GPU machine, from the checkout's root, with this folder beside the code:",
            f'    folders it needs there: {relative}/ (the workplace\'s device tool: carry=["{relative}"])',
            f"    command:                {DEVICE_COMMAND}",
            "It installs the wheels into /tmp/site, runs every family (FLUX.1, SD3.5, FLUX.2 klein, Z-Image,",
            "Qwen-Image, SD1.5, SDXL), ours and the reference, under 8 minutes, and writes gpu_bench.json",
            "and gpu_bench.md to $OUT (default ./gpu-bench-out).",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--diffusers-src",
        default=os.environ.get("DIFFUSERS_SRC"),
        help="a diffusers source tree or a local git mirror of one (env DIFFUSERS_SRC)",
    )
    parser.add_argument(
        "--diffusers-ref",
        default=os.environ.get("DIFFUSERS_REF") or None,
        help="the tag or commit to read from a git mirror (env DIFFUSERS_REF; default HEAD)",
    )
    parser.add_argument("--bundle", type=Path, default=BUNDLE)
    parser.add_argument("--no-wheels", action="store_true", help="reuse the wheels already in the bundle")
    parser.add_argument(
        "--local-reference-deps",
        action="store_true",
        help=f"only install the reference's packages for this Python into {LOCAL_DEPS_DIR}",
    )
    args = parser.parse_args(argv)
    if args.local_reference_deps:
        print(install_local_reference_deps())
        return
    if not args.diffusers_src:
        raise SystemExit(
            "make gpu-bundle needs a local diffusers source snapshot for the reference scripts: the diffusers "
            "sdist on PyPI has no examples/. Set DIFFUSERS_SRC to a diffusers source tree (an unpacked release "
            "archive) or a local git mirror (then DIFFUSERS_REF=v0.40.0 or another tag)."
        )
    build(args.bundle, Path(args.diffusers_src), args.diffusers_ref, wheels=not args.no_wheels)
    import bench_gpu  # beside this file; checks the scripts accept every flag the benchmark passes

    bench_gpu.check_reference_flags(args.bundle / "reference")
    print(instructions(args.bundle))


if __name__ == "__main__":
    main()
