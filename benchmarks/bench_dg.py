"""How long Dagster takes to load the code location, and what `dg check defs` costs beside it.

Each figure is the median of ``--repeat`` fresh processes (a code server, `dg` and the run
worker each start one), in the same run:

* **import dagster**: the floor, what any code location pays;
* **pipeline, no components**: ``lora_pipeline.defs.pipeline.PIPELINE`` resolved to a
  repository (assets, checks, jobs, sensors, resources bound): the pipeline alone;
* **code location**: ``lora_pipeline.definitions`` resolved, as a code server loads it: the
  pipeline plus the (empty) declared-styles folder read with Dagster's component tree;
* **code location, N declared styles**: the same loader on a folder of N ``LoraTraining``
  defs.yaml files (half scheduled, half automated);
* **dg check defs** and **dg list defs --json**: the commands `make test` runs, end to end
  (dg's own start, its YAML check, a subprocess that loads the code location).

    .venv/bin/python benchmarks/bench_dg.py [--repeat 5] [--styles 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

DECLARED_LOADER = """
import importlib, sys
from pathlib import Path
root = Path(sys.argv[1])
sys.path.insert(0, str(root))
from lora_pipeline.defs.pipeline import pipeline_with_declared_styles
pipeline_with_declared_styles(importlib.import_module("bench_styles"), root).get_repository_def()
"""


def median_s(command: list[str], repeat: int, env: dict[str, str]) -> float:
    """The median wall time of ``command`` run ``repeat`` times; fails loudly if it fails."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
        times.append(time.perf_counter() - start)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    return statistics.median(times)


def declared_styles_folder(root: Path, count: int) -> Path:
    """A package of ``count`` LoraTraining defs.yaml files."""
    package = root / "bench_styles"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for i in range(count):
        folder = package / f"style_{i:03d}"
        folder.mkdir()
        extra = "  schedule: '0 3 * * *'\n" if i % 2 else "  automation: on_new_dataset_version\n"
        (folder / "defs.yaml").write_text(
            "type: lora_pipeline.LoraTraining\nattributes:\n"
            f"  style: style_{i:03d}\n  trigger_word: s{i}\n  params: {{rank: 8}}\n{extra}"
        )
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--styles", type=int, default=20, help="declared styles in the second code location")
    args = parser.parse_args()
    env = {**os.environ, "VIRTUAL_ENV": str(BIN.parent), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    python = sys.executable

    floor = median_s([python, "-c", "import dagster"], args.repeat, env)
    pipeline = median_s(
        [python, "-c", "from lora_pipeline.defs.pipeline import PIPELINE; PIPELINE.get_repository_def()"],
        args.repeat,
        env,
    )
    location = median_s(
        [python, "-c", "from lora_pipeline.definitions import defs; defs.get_repository_def()"], args.repeat, env
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = declared_styles_folder(Path(tmp), args.styles)
        declared = median_s([python, "-c", DECLARED_LOADER, str(root)], args.repeat, env)
    check = median_s([str(BIN / "dg"), "check", "defs"], args.repeat, env)
    listing = median_s([str(BIN / "dg"), "list", "defs", "--json"], args.repeat, env)

    rows = [
        ("import dagster (the floor)", floor),
        ("pipeline, no components (PIPELINE resolved)", pipeline),
        ("code location (lora_pipeline.definitions resolved)", location),
        (f"code location, {args.styles} declared styles", declared),
        ("dg check defs", check),
        ("dg list defs --json", listing),
    ]
    print(f"median of {args.repeat} fresh processes each, Python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    for name, seconds in rows:
        print(f"  {name:<52} {seconds:6.2f} s")
    print(f"component tree on the empty styles folder: {location - pipeline:+.2f} s")
    print(f"{args.styles} declared styles over none: {declared - location:+.2f} s")
    print(f"dg check defs / code location load: {check / location:.1f}x")


if __name__ == "__main__":
    main()
