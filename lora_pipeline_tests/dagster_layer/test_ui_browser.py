"""The README's UI walk-through, clicked through in a real headless Chromium.

`dg dev` (webserver + daemon, as `make dev` starts it) runs on a temporary DAGSTER_HOME,
store and jobs folder; Playwright drives Debian's `chromium` through the launchpad to materialize
`training_dataset`, `trained_lora` and `lora_registry` for `sample_style` (with a few training
steps), waits for the run to succeed, and reads `V1`, its checks and its samples off the asset
pages; then it promotes V1 to `production` from `promote_lora_version`'s launchpad and reads the
alias off `lora_registry`'s Events tab; a promote of an unknown version is refused at launch; an
alias moved with the CLI shows on the Events tab (registry_change_sensor); and a style added with
`lora-pipeline dataset add` materializes its stored dataset version. With LORA_UPDATE_SCREENSHOTS=1 it also writes the
README's screenshots to docs/images/.

The browser is Debian's `chromium` (Playwright's own download cannot be reached here): found on
PATH, else installed with apt-get when running as root; the test is skipped, saying why, only
where neither works.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from lora_pipeline.dataset.ingest import sample_dataset_path
from lora_pipeline_tests.dagster_layer.conftest import dg_dev
from lora_pipeline_tests.dagster_layer.test_launch_config import LAUNCH

pytestmark = pytest.mark.slow
DEV_STORES: dict[str, str] = {}  # the webserver's URL → the store its `dg dev` uses

REPO = Path(__file__).resolve().parents[2]
IMAGES = REPO / "docs" / "images"
STYLE = "sample_style"
VIEWPORT = {"width": 1280, "height": 800}
# What the launchpad's editor is set to: a few training steps (seconds on a CPU) and quick samples;
# everything else keeps its default (the tiny preset's two samples included).
RUN_CONFIG_YAML = """\
ops:
  trained_lora:
    config:
      params:
        max_train_steps: 4
        sample_inference_steps: 2
      poll_interval_s: 0.5
"""
PROMOTE_CONFIG_YAML = f"""\
ops:
  move_lora_alias:
    config:
      style: {STYLE}
      version: V1
      alias: production
      reason: first release
"""
RUN_TIMEOUT_S = 480  # a ceiling: on a busy 2-core machine the run can take minutes
# Read at import: the hermetic-environment fixture clears every LORA_* variable before each test.
UPDATE_SCREENSHOTS = os.environ.get("LORA_UPDATE_SCREENSHOTS") == "1"
CHECKS = ["unique_version_names", "unique_job_ids", "completed_versions_have_files", "no_presigned_urls"]


def _find_or_install_chromium() -> str | None:
    for candidate in (shutil.which("chromium"), "/usr/bin/chromium"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.fixture(scope="session")
def chromium_path() -> str:
    """Debian's chromium: on PATH, else `apt-get install chromium` as root, else a skip saying why."""
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the `dev` extra)")
    found = _find_or_install_chromium()
    if found:
        return found
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        pytest.skip(
            "no chromium on PATH and it cannot be installed here (needs root and apt-get: apt-get install chromium)"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        done = subprocess.run(
            [apt, "install", "-y", "-q", "chromium"], env=env, capture_output=True, text=True, timeout=600
        )
        if done.returncode != 0:  # a stale package list: update once, then try again
            subprocess.run([apt, "update", "-q"], env=env, capture_output=True, timeout=300)
            done = subprocess.run(
                [apt, "install", "-y", "-q", "chromium"], env=env, capture_output=True, text=True, timeout=600
            )
    except subprocess.TimeoutExpired:
        pytest.skip("no chromium on PATH and `apt-get install chromium` did not finish within its timeout")
    found = _find_or_install_chromium()
    if found is None:
        pytest.skip(f"no chromium on PATH and `apt-get install chromium` failed: {done.stderr[-500:]}")
    return found


@pytest.fixture
def browser(chromium_path: str):
    from playwright.sync_api import sync_playwright

    args = ["--no-sandbox"] if os.geteuid() == 0 else []  # Chromium's sandbox refuses to run as root
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium_path, headless=True, args=args)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def dagster_dev(tmp_path: Path):
    """`dg dev` (what `make dev` runs) on a temporary instance and store, with `sample_style`
    already a partition."""
    import dagster as dg

    from lora_pipeline.defs.partitions import STYLES_PARTITIONS_NAME

    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster.dev.yaml", home / "dagster.yaml")
    env = {
        "DAGSTER_HOME": str(home),
        "LORA_STORAGE_URL": (tmp_path / "store").as_uri(),
        "LORA_LOCAL_JOBS_DIR": str(tmp_path / "jobs"),
    }
    # What style_discovery_sensor does within seconds of start-up, done before it, so that the
    # test does not wait for a tick.
    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.add_dynamic_partitions(STYLES_PARTITIONS_NAME, [STYLE])
    with dg_dev(REPO, tmp_path / "dagster_dev.log", **env) as url:
        DEV_STORES[url] = env["LORA_STORAGE_URL"]
        yield url


def _gql(url: str, query: str, **variables) -> dict:
    answer = httpx.post(f"{url}/graphql", json={"query": query, "variables": variables}, timeout=60).json()
    assert "errors" not in answer, answer
    return answer["data"]


def _runs(url: str) -> list[dict]:
    data = _gql(url, "{ runsOrError { ... on Runs { results { runId status tags { key value } } } } }")
    return data["runsOrError"]["results"]


def _wait_for_run(url: str, timeout_s: float) -> dict:
    """The run the launchpad started, once it has finished."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for run in _runs(url):
            if {"key": "dagster/partition", "value": STYLE} in run["tags"] and run["status"] in (
                "SUCCESS",
                "FAILURE",
                "CANCELED",
            ):
                return run
        time.sleep(1)
    pytest.fail(f"no finished run for {STYLE} after {timeout_s} s: {_runs(url)}")


def _wait_for_job_run(url: str, job: str, timeout_s: float) -> dict:
    """The latest run of ``job``, once it has finished."""
    query = """query($job: String!) { runsOrError(filter: {pipelineName: $job}, limit: 1) {
        ... on Runs { results { runId status } } } }"""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        runs = _gql(url, query, job=job)["runsOrError"]["results"]
        if runs and runs[0]["status"] in ("SUCCESS", "FAILURE", "CANCELED"):
            return runs[0]
        time.sleep(1)
    pytest.fail(f"no finished {job} run after {timeout_s} s")


def _latest_metadata_labels(url: str, asset: str) -> set[str]:
    data = _gql(
        url,
        """query($key: AssetKeyInput!, $p: [String!]) { assetOrError(assetKey: $key) {
        ... on Asset { assetMaterializations(partitions: $p, limit: 1) { metadataEntries { label } } } } }""",
        key={"path": [asset]},
        p=[STYLE],
    )
    [materialization] = data["assetOrError"]["assetMaterializations"]
    return {entry["label"] for entry in materialization["metadataEntries"]}


def _screenshot(page, name: str) -> None:
    """docs/images/<name>, only when asked (LORA_UPDATE_SCREENSHOTS=1): CI leaves the repo alone."""
    if UPDATE_SCREENSHOTS:
        page.mouse.move(0, 0)  # no hover effects in the picture
        page.wait_for_timeout(3000)  # the live status (the graph's colours) arrives after the page
        IMAGES.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(IMAGES / name))


def _skip_welcome_dialog(page) -> None:
    """A fresh instance greets the first visit with a 'Join the Dagster community' dialog."""
    skip = page.get_by_role("button", name="Skip")
    try:
        skip.wait_for(timeout=15_000)  # it can come late on a busy machine, and then blocks every click
    except Exception:  # noqa: BLE001 - no dialog this time
        return
    skip.click()


def test_the_readme_walk_through_in_a_browser(dagster_dev: str, browser, tmp_path: Path):
    """Launch the three assets for sample_style from the UI; the registry page shows V1 and its checks."""
    page = browser.new_page(viewport=VIEWPORT)
    page.set_default_timeout(60_000)
    try:
        _walk_through(page, dagster_dev)
    except BaseException:
        page.screenshot(path=str(tmp_path / "failure.png"))  # what the browser showed, for the report
        print(f"the page at the failure: {tmp_path / 'failure.png'} ({page.url})")
        raise


def _walk_through(page, dagster_dev: str) -> None:
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError
    from playwright.sync_api import expect

    # 1. Assets → the lora group's lineage: the three assets.
    page.goto(f"{dagster_dev}/asset-groups/lora")
    _skip_welcome_dialog(page)
    for asset in ("training_dataset", "trained_lora", "lora_registry"):
        expect(page.get_by_text(asset, exact=True).first).to_be_visible()

    # 2. Materialize all… ▾ → Open launchpad: partition sample_style, a short training.
    materialize = page.get_by_role("button", name="Materialize all…")
    materialize.locator("xpath=../..").get_by_role("button").last.click()  # the ▾ beside it
    page.get_by_role("menuitem", name="Open launchpad").click()
    dialog = page.get_by_role("dialog").filter(has=page.get_by_text("Launchpad (configure assets)"))
    expect(dialog).to_be_visible()
    expect(dialog.get_by_text("wait_timeout_s")).to_be_visible()  # loaded; else the input is reset
    partition, option = dialog.get_by_placeholder("Partition"), page.get_by_role("menuitem", name=STYLE)
    for _ in range(5):
        partition.fill(STYLE)
        try:
            option.wait_for(timeout=5000)
            break
        except PlaywrightTimeoutError:
            continue
    option.click()
    # Choosing the partition fills the editor with the partition's default config: set the
    # short training after that (the launchpad's YAML editor is a CodeMirror).
    expect(dialog.get_by_text(f"partition: {STYLE}")).to_be_visible()
    editor = dialog.locator(".CodeMirror").first
    expect(editor).to_contain_text("wait_timeout_s")
    editor.evaluate("(element, yaml) => element.CodeMirror.setValue(yaml)", RUN_CONFIG_YAML)
    expect(editor).to_contain_text("max_train_steps")
    expect(dialog.get_by_text("No errors")).to_be_visible()
    dialog.get_by_role("button", name=re.compile(r"Materialize$")).click()

    # 3. The run succeeds; its page says so.
    run = _wait_for_run(dagster_dev, RUN_TIMEOUT_S)
    assert run["status"] == "SUCCESS", run
    page.goto(f"{dagster_dev}/runs/{run['runId']}")
    expect(page.get_by_text("Success").first).to_be_visible()
    expect(page.get_by_text(re.compile(r"^Finished execution of run")).first).to_be_visible()
    _screenshot(page, "ui-run-success.png")

    # The lineage after the run: every asset materialized (green) in the sidebar's list.
    page.goto(f"{dagster_dev}/asset-groups/lora")
    for asset in ("training_dataset", "trained_lora", "lora_registry"):
        expect(page.get_by_text(asset, exact=True).first).to_be_visible()
    _screenshot(page, "ui-asset-graph.png")

    # 4. lora_registry for sample_style: V1 completed in the versions table.
    page.goto(f"{dagster_dev}/assets/lora_registry?view=partitions&partition={STYLE}")
    expect(page.get_by_text("Materialized", exact=True).first).to_be_visible()
    expect(_row(page, "latest_version")).to_contain_text("V1")
    versions_table = _row(page, "versions_table")
    expect(versions_table).to_contain_text("V1")
    expect(versions_table).to_contain_text("completed")
    expect(versions_table).to_contain_text("kohya")
    expect(versions_table).to_contain_text("diffusers")
    _screenshot(page, "ui-registry-v1.png")

    # Its checks, each passed on this materialization.
    page.goto(f"{dagster_dev}/assets/lora_registry?view=checks")
    for check in CHECKS:
        # the list's row for the check: the nearest element around its name that has a status
        row = page.get_by_text(check, exact=True).first.locator(
            "xpath=ancestor::*[contains(., 'Succeeded') or contains(., 'Failed') or contains(., 'Warning')][1]"
        )
        expect(row).to_contain_text("Succeeded")

    # 5. Its samples, on trained_lora's materialization (the `samples` Markdown, images inline).
    assert "samples" in _latest_metadata_labels(dagster_dev, "trained_lora")
    page.goto(f"{dagster_dev}/assets/trained_lora?view=partitions&partition={STYLE}")
    expect(_row(page, "sample_count")).to_contain_text("2")
    _row(page, "samples").get_by_text("[Show Markdown]").click()
    samples = page.get_by_role("dialog").locator("img")
    expect(samples).to_have_count(2)
    widths = samples.evaluate_all("images => images.map(image => image.naturalWidth)")
    assert all(width > 0 for width in widths), widths  # the images decode, not broken icons
    _screenshot(page, "ui-samples.png")
    page.keyboard.press("Escape")
    # Their prompts and seeds: a table beside the grid.
    prompts = _row(page, "sample_prompts")
    expect(prompts).to_contain_text(f"{STYLE}_v1_sample_0.png")
    expect(prompts).to_contain_text(f"{STYLE}_v1_sample_1.png")

    # 6. Promote V1 to production from promote_lora_version's launchpad; the registry asset's
    # Events tab shows the move and the aliases as an observation.
    page.goto(f"{dagster_dev}/jobs")
    page.get_by_role("link", name="promote_lora_version").first.click()
    page.get_by_role("tab", name="Launchpad").click()
    editor = page.locator(".CodeMirror").first
    expect(editor).to_be_visible()
    editor.evaluate("(element, yaml) => element.CodeMirror.setValue(yaml)", PROMOTE_CONFIG_YAML)
    expect(page.get_by_text("No errors")).to_be_visible()
    page.get_by_role("button", name="Launch Run").click()
    promoted = _wait_for_job_run(dagster_dev, "promote_lora_version", 120)
    assert promoted["status"] == "SUCCESS", promoted
    page.goto(f"{dagster_dev}/assets/lora_registry?view=events&partition={STYLE}")
    expect(page.get_by_text(f"{STYLE} production: (new) → V1").first).to_be_visible()
    aliases = _row(page, "aliases")
    expect(aliases).to_contain_text("production")
    expect(aliases).to_contain_text(f"{STYLE}_v1_kohya.safetensors")
    expect(aliases).to_contain_text("first release")
    _screenshot(page, "ui-promote.png")

    # 7. A bad promote is refused at launch, in one line, and creates no run.
    runs_before = len(_runs(dagster_dev))
    refused = _launch(dagster_dev, "promote_lora_version", {"ops": {"move_lora_alias": {"config": BAD_PROMOTE}}})
    assert refused["__typename"] == "PythonError", refused
    assert f"promote_lora_version config: {STYLE} has no version V9 (it has: V1)" in refused["message"]
    assert len(_runs(dagster_dev)) == runs_before

    # 8. An alias moved with the CLI shows on lora_registry's Events tab, no materialization needed.
    _cli(dagster_dev, "registry", "promote", STYLE, "@production", "--alias", "staging")
    _expect_within(page, f"{dagster_dev}/assets/lora_registry?view=events&partition={STYLE}", "staging=V1", 120)

    # 9. A style added with `dataset add` materializes its stored dataset version.
    _cli(dagster_dev, "dataset", "add", ADDED_STYLE, str(sample_dataset_path()))
    _wait_for_partition(dagster_dev, ADDED_STYLE, 120)  # style_discovery_sensor adds it
    added = _launch(
        dagster_dev,
        "__ASSET_JOB",
        {},
        assets=["training_dataset"],
        tags={"dagster/partition": ADDED_STYLE},
    )
    assert added["__typename"] == "LaunchRunSuccess", added
    assert _wait_for_run_id(dagster_dev, added["run"]["runId"], 180) == "SUCCESS"


BAD_PROMOTE = {"style": STYLE, "version": "V9", "alias": "production"}
ADDED_STYLE = "added_style"


def _launch(url: str, job: str, run_config: dict, *, assets: list[str] | None = None, tags: dict | None = None) -> dict:
    """Launch ``job`` as the launchpad does (its GraphQL mutation)."""
    [repository] = _gql(
        url, "{ repositoriesOrError { ... on RepositoryConnection { nodes { name location { name } } } } }"
    )["repositoriesOrError"]["nodes"]
    selector: dict = {
        "repositoryLocationName": repository["location"]["name"],
        "repositoryName": repository["name"],
        "pipelineName": job,
    }
    if assets:
        selector["assetSelection"] = [{"path": [asset]} for asset in assets]
    params = {
        "selector": selector,
        "mode": "default",
        "runConfigData": run_config,
        "executionMetadata": {"tags": [{"key": k, "value": v} for k, v in (tags or {}).items()]},
    }
    return _gql(url, LAUNCH, executionParams=params)["launchPipelineExecution"]


def _cli(url: str, *args: str) -> None:
    """``lora-pipeline ARGS`` against the store `dagster dev` uses."""
    done = subprocess.run(
        [str(Path(sys.executable).with_name("lora-pipeline")), *args],
        env={**os.environ, "LORA_STORAGE_URL": DEV_STORES[url]},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def _wait_for_run_id(url: str, run_id: str, timeout_s: float) -> str:
    """The status of run ``run_id`` once it has finished."""
    query = "query($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = _gql(url, query, id=run_id)["runOrError"]["status"]
        if status in ("SUCCESS", "FAILURE", "CANCELED"):
            return status
        time.sleep(1)
    pytest.fail(f"run {run_id} not finished after {timeout_s} s")


def _wait_for_partition(url: str, style: str, timeout_s: float) -> None:
    query = """{ partitionSetsOrError: assetOrError(assetKey: {path: ["training_dataset"]}) {
        ... on Asset { definition { partitionKeys } } } }"""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if style in _gql(url, query)["partitionSetsOrError"]["definition"]["partitionKeys"]:
            return
        time.sleep(2)
    pytest.fail(f"no partition {style} after {timeout_s} s")


def _expect_within(page, address: str, text: str, timeout_s: float) -> None:
    """Reload ``address`` until ``text`` shows (a sensor tick away)."""
    deadline = time.monotonic() + timeout_s
    while True:
        page.goto(address)
        try:
            page.get_by_text(text).first.wait_for(timeout=10_000)
            return
        except Exception:  # noqa: BLE001 - not yet: reload
            if time.monotonic() > deadline:
                raise


def _row(page, label: str):
    """The metadata table's row for ``label``: the row whose first cell is the label (a table in a
    value, e.g. versions_table's "aliases" column, has cells with the same text)."""
    return page.locator("tr", has=page.locator(f"xpath=./td[1][normalize-space(.)='{label}']"))
