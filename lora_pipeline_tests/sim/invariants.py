"""What must hold after a schedule has drained, whatever the seed did on the way.

Each check returns the violations it finds as one-line strings (empty: it held):

* each version has at most one RunPod job, and each job is in exactly one version, the one
  its request named (unless nothing links them: a lost /run answer, a job that did not complete
  and wrote no start marker; then its version is failed); a version number is never given to
  two requests (never reused);
* every finished job is settled: its version is completed iff its LoRA file parses, and
  no version is left unfinished;
* an alias points at a completed version whose files are readable;
* a deleted version has no files after reconciliation;
* a version seen completed loses its file only by a delete (then it is ``deleted``);
* a rollback target (every version in an alias's history since its last removal) is never
  deleted by the retention;
* every inbox file, the receiver's and those outside tools dropped, ends in ``processed/``
  or in ``rejected/`` with its reason (or was pruned from there by housekeeping);
* the index agrees with the documents;
* no action raised an exception its caller does not expect.
"""

from __future__ import annotations

from lora_pipeline.registry.aliases import alias_stacks
from lora_pipeline.registry.merge import merge
from lora_pipeline.registry.models import RegistryDocument, Version, VersionStatus
from lora_pipeline.registry.names import parse_lora_file
from lora_pipeline.registry.safetensors_header import InvalidLoraFile
from lora_pipeline.registry_store.documents import RegistryStore
from lora_pipeline.registry_store.index import StyleSummary
from lora_pipeline.registry_store.lora_files import read_header
from lora_pipeline.storage.keys import (
    WEBHOOK_INBOX,
    WEBHOOK_PROCESSED,
    WEBHOOK_REJECTED,
    lora_key,
    lora_prefix,
    run_marker_key,
)
from lora_pipeline.webhook.inbox import REASON_SUFFIX
from lora_pipeline_tests.sim.runpod import SimJob
from lora_pipeline_tests.sim.world import STYLES, World


def check(world: World) -> list[str]:
    """Every violation of the invariants above in ``world`` after its drain."""
    registry = RegistryStore(world.store)
    docs = {style: registry.read(style)[0] for style in registry.styles()}
    found: list[str] = []
    for rule in (
        _one_job_per_version,
        _numbers_not_reused,
        _jobs_settled,
        _aliases_readable,
        _deleted_have_no_files,
        _completed_keep_files,
        _rollback_targets_survive_retention,
    ):
        found += rule(world, docs)
    found += _inbox_accounted(world)
    found += _index_agrees(world, registry, docs)
    found += [f"unexpected exception in {u}" for u in world.ledger.unexpected]
    return found


def _readable(world: World, key: str) -> bool:
    try:
        read_header(world.store, key)
    except InvalidLoraFile:
        return False
    return True


def _one_job_per_version(world: World, docs: dict[str, RegistryDocument]) -> list[str]:
    found = []
    per_version: dict[tuple[str, str], list[str]] = {}
    for job in world.runpod.jobs.values():
        style, name = job.input["style"], job.input["version"]
        per_version.setdefault((style, name), []).append(job.id)
        holders = [v.name for v in docs[style].versions if job.base in v.job_bases] if style in docs else []
        if not holders and _unattachable(world, job, docs[style].version(name) if style in docs else None):
            continue
        if holders != [name]:
            found.append(f"job {job.id} for {style} {name} is held by {holders or 'no version'}")
    found += [
        f"{s} {n} was sent to RunPod {len(ids)} times: {ids}" for (s, n), ids in per_version.items() if len(ids) > 1
    ]
    for style in STYLES:
        for v in docs.get(style, RegistryDocument(style)).versions:
            if len(v.job_ids) > 1:
                found.append(f"{style} {v.name} holds jobs {list(v.job_ids)}")
    return found


def _unattachable(world: World, job: SimJob, version: Version | None) -> bool:
    """A job nothing links to its version, as docs/reliability.md (promise 2) allows: its /run answer
    was lost (the version never learned its id and was failed as a lost submission), it did not
    complete (a completed job's output names its request), and no start marker of it was written."""
    marker = run_marker_key(job.input["style"], job.input["version"], job.id)
    return (
        version is not None
        and version.status is VersionStatus.failed
        and version.id is None
        and version.claim is not None
        and version.claim.maybe_submitted
        and job.status != "COMPLETED"
        and marker not in world.store.objects
        and marker not in world.ledger.pruned
    )


def _numbers_not_reused(world: World, docs: dict[str, RegistryDocument]) -> list[str]:
    requests: dict[tuple[str, str], set[str]] = {}
    for job in world.runpod.jobs.values():
        requests.setdefault((job.input["style"], job.input["version"]), set()).add(job.input["request_id"])
    found = [f"{s} {n} was reused by requests {sorted(r)}" for (s, n), r in requests.items() if len(r) > 1]
    for (style, name), ids in requests.items():
        version = docs[style].version(name) if style in docs else None
        if version is not None and version.request_id not in ids:
            found.append(f"{style} {name} records request {version.request_id}, its job ran {sorted(ids)}")
    return found


def _jobs_settled(world: World, docs: dict[str, RegistryDocument]) -> list[str]:
    found = []
    for job in world.runpod.jobs.values():
        style, name = job.input["style"], job.input["version"]
        version = docs[style].version(name) if style in docs else None
        if version is None:
            continue  # reported by _one_job_per_version
        if version.status is VersionStatus.deleted:
            continue
        if not version.status.finished:
            found.append(f"{style} {name} ({job.status}) is still {version.status.value}")
            continue
        parses = _readable(world, lora_key(style, version.number))
        if (version.status is VersionStatus.completed) != parses:
            found.append(f"{style} {name}: {version.status.value}, file parses: {parses}, job {job.status}")
    for style in STYLES:
        for v in docs.get(style, RegistryDocument(style)).versions:
            if v.request_id and not v.status.finished:
                found.append(f"{style} {v.name} is left {v.status.value} (claim {v.claim})")
    return found


def _aliases_readable(world: World, docs: dict[str, RegistryDocument]) -> list[str]:
    found = []
    for style, doc in docs.items():
        for alias, name in doc.aliases.items():
            version = doc.version(name)
            if version is None or version.status is not VersionStatus.completed:
                found.append(f"{style} {alias} points at {name}, {version.status.value if version else 'absent'}")
                continue
            for f in (version.file, *version.companions):
                if f is None or not _readable(world, f.key):
                    found.append(f"{style} {alias} points at {name}, whose file {f.key if f else None} is not readable")
    return found


def _files_of(world: World, style: str) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for info in world.store.list_unscheduled(lora_prefix(style)):
        parsed = parse_lora_file(style, info.key.rsplit("/", 1)[-1]) if info.key.count("/") == 2 else None
        if parsed is not None:
            out.setdefault(parsed[0], []).append(info.key)
    return out


def _deleted_have_no_files(world: World, docs: dict[str, RegistryDocument]) -> list[str]:
    found = []
    for style, doc in docs.items():
        files = _files_of(world, style)
        for v in doc.versions:
            if v.status is VersionStatus.deleted:
                left = [k for n in v.numbers for k in files.get(n, [])]
                if left:
                    found.append(f"{style} {v.name} is deleted but its files remain: {left}")
    return found


def _completed_keep_files(world: World, docs: dict[str, RegistryDocument]) -> list[str]:
    found = []
    for (style, name), key in sorted(world.ledger.completed_seen.items()):
        version = docs[style].version(name) if style in docs else None
        if version is not None and version.status is VersionStatus.deleted:
            continue  # a delete (an operator's or the retention's) took it
        if version is None or version.status is not VersionStatus.completed:
            found.append(f"{style} {name} was completed and is now {version.status.value if version else 'gone'}")
        elif not _readable(world, key):
            found.append(f"{style} {name} is completed but its file {key} is gone or unreadable")
    return found


def _rollback_targets_survive_retention(world: World, docs: dict[str, RegistryDocument]) -> list[str]:
    found = []
    for style, doc in docs.items():
        for alias, stack in alias_stacks(doc.alias_history).items():
            for name in stack[:-1]:
                if (style, name) in world.ledger.retention_deleted:
                    found.append(f"{style} {name}, where {alias} rolls back to, was deleted by the retention")
    return found


def _inbox_accounted(world: World) -> list[str]:
    store = world.store
    left = [i.key for i in store.list_unscheduled(WEBHOOK_INBOX + "/")]
    found = [f"left in the inbox after the drain: {left}"] if left else []
    processed = {i.key[len(WEBHOOK_PROCESSED) + 1 :] for i in store.list_unscheduled(WEBHOOK_PROCESSED + "/")}
    rejected = {i.key[len(WEBHOOK_REJECTED) + 1 :] for i in store.list_unscheduled(WEBHOOK_REJECTED + "/")}
    pruned = {
        k.split("/", 2)[2] for k in world.ledger.pruned if k.startswith(("webhooks/processed/", "webhooks/rejected/"))
    }
    for key in sorted(world.ledger.inbox_written | world.ledger.dropped):
        name = key[len(WEBHOOK_INBOX) + 1 :]
        stem, dot, suffix = name.rpartition(".")
        hashed = (
            [n for n in processed | rejected if n.startswith(stem + ".") and n.endswith(dot + suffix)] if dot else []
        )
        if name in processed or name in pruned or (name in rejected and name + REASON_SUFFIX in rejected):
            continue
        if any(n in processed or (n + REASON_SUFFIX in rejected) for n in hashed):
            continue  # moved under a hashed name: another file had taken its name
        found.append(f"{key} was lost: neither processed nor rejected with a reason")
    return found


def _index_agrees(world: World, registry: RegistryStore, docs: dict[str, RegistryDocument]) -> list[str]:
    index, stale = registry.fresh_index(repair=False)
    found = [f"index stale for {stale}"] if stale else []
    for style in docs:
        stored = registry.read_stored(style)
        if index.styles.get(style) != StyleSummary.of(merge(stored.document, ()), stored.etag, registry.primary):
            found.append(f"index entry of {style} differs from its document")
    return found
