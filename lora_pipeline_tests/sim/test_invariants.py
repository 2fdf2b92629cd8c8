"""Each invariant catches the violation it names: a drained world is tampered with, then checked.

(The seeds in test_simulation.FOUND show the inbox, one-job-per-version and rollback-target
invariants failing on the code before issue 22's fixes; these show the others can fail too.)
"""

from __future__ import annotations

import dataclasses

import pytest

from lora_pipeline.registry.models import VersionStatus
from lora_pipeline.registry_store.documents import RegistryStore
from lora_pipeline.storage.keys import WEBHOOK_INBOX
from lora_pipeline_tests.sim.invariants import check
from lora_pipeline_tests.sim.world import World, run_schedule


def fresh(seed: int = 3) -> tuple[World, RegistryStore, str, str]:
    """A drained world, a registry on it, and one of its completed versions (style, name)."""
    world = run_schedule(seed, 40)
    registry = RegistryStore(world.store, primary="diffusers")
    for style in registry.styles():
        for v in registry.read(style)[0].versions:
            if v.status is VersionStatus.completed and v.request_id and not registry.read(style)[0].aliases_of(v):
                return world, registry, style, v.name
    raise AssertionError("no completed version in the schedule")


def test_a_completed_version_that_lost_its_file_is_caught():
    world, registry, style, name = fresh()
    key = registry.read(style)[0].version(name).file.key
    world.store._remove(key)
    assert any(f"{style} {name} is completed but its file" in v for v in check(world))


def test_an_alias_on_an_unreadable_version_is_caught():
    world, registry, style, name = fresh()
    registry.move_alias(style, "prod", action="promote", by="test", version=name)
    world.store.drop(registry.read(style)[0].version(name).file.key, b"not a safetensors file")
    assert any(f"{style} prod points at {name}, whose file" in v for v in check(world))


def test_a_deleted_version_whose_file_is_back_is_caught():
    world, registry, style, name = fresh()
    key = registry.read(style)[0].version(name).file.key
    data = world.store.objects[key].data
    registry.delete_version(style, name, by="test")
    world.store.drop(key, data)
    assert any(f"{style} {name} is deleted but its files remain" in v for v in check(world))


def test_a_version_number_given_to_a_second_request_is_caught():
    world, _, _, _ = fresh()
    job = next(iter(world.runpod.jobs.values()))
    other = dataclasses.replace(job, id=job.id[:-2] + "e9", input={**job.input, "request_id": "someone-else"})
    world.runpod.jobs[other.id] = other
    assert any("was reused by requests" in v for v in check(world))


def test_an_inbox_file_left_behind_is_caught():
    world, _, _, _ = fresh()
    key = f"{WEBHOOK_INBOX}/late copy.json"
    world.store.drop(key, b"{}")
    world.ledger.dropped.add(key)
    found = check(world)
    assert any("left in the inbox" in v for v in found) and any(f"{key} was lost" in v for v in found)


def test_a_rollback_target_deleted_by_the_retention_is_caught():
    world, registry, style, name = fresh()
    doc = registry.read(style)[0]
    later = [v.name for v in doc.versions if v.status is VersionStatus.completed and v.name != name]
    if not later:
        pytest.skip("the schedule completed one version only")
    registry.move_alias(style, "prod", action="promote", by="test", version=name)
    registry.move_alias(style, "prod", action="promote", by="test", version=later[0])
    world.ledger.retention_deleted.add((style, name))  # as if the retention had taken it
    assert any(f"{style} {name}, where prod rolls back to" in v for v in check(world))


def test_an_unexpected_exception_is_caught():
    world, _, _, _ = fresh()
    world.ledger.unexpected.append("submit: Traceback …\nStopIteration")
    assert any(v.startswith("unexpected exception in submit") for v in check(world))


def test_a_job_no_version_holds_is_caught_unless_nothing_could_link_it():
    """Only a job nothing links to its version (lost /run answer, no completion, no start marker:
    its version failed as a lost submission) may be in no version; any other stray job is caught."""
    world, _, style, name = fresh()
    job = next(j for j in world.runpod.jobs.values() if (j.input["style"], j.input["version"]) == (style, name))
    base = "f" * 8 + job.base[8:]
    stray = dataclasses.replace(job, base=base, id=f"{base}-u1", status="FAILED", output=None)
    world.runpod.jobs[stray.id] = stray
    assert any(f"job {stray.id} for {style} {name} is held by no version" in v for v in check(world))
