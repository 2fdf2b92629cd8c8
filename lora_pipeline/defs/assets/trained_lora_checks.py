"""``lora_file_matches_registry``: the stored LoRA files are the ones the registry describes.

Runs after every ``trained_lora`` materialization (by hand or in ``complete_training``), and
alone from the checks tab. For the style's latest completed version (every style's, when run
alone) each recorded file (kohya, diffusers, any other) must be in the store with the size
and ETag the registry recorded, its safetensors header must parse (ranged reads, never the
whole file), and the tensor-data SHA-256 its header declares must equal the recorded one.
A mismatch means the file was replaced or truncated after it was recorded.
"""

from dataclasses import dataclass

import dagster as dg

from lora_pipeline.defs.resources import StorageResource
from lora_pipeline.registry.models import LoraFile, Version
from lora_pipeline.registry.safetensors_header import InvalidLoraFile
from lora_pipeline.registry_store.documents import RegistryStore
from lora_pipeline.registry_store.lora_files import read_header
from lora_pipeline.storage.base import ObjectStore

PARTITION_TAG = "dagster/partition"
FILES_SCHEMA = dg.TableSchema(
    columns=[
        dg.TableColumn("style", "string"),
        dg.TableColumn("version", "string"),
        dg.TableColumn("layout", "string"),
        dg.TableColumn("file", "string", description="the file name (its key is in the registry)"),
        dg.TableColumn("size", "string", description="recorded, and in the store when different"),
        dg.TableColumn("etag", "string", description="ok, or recorded → stored"),
        dg.TableColumn("sha256", "string", description="ok, not recorded, or recorded → declared by the header"),
        dg.TableColumn("problem", "string"),
    ]
)


@dataclass(frozen=True)
class FileComparison:
    style: str
    version: str
    layout: str
    file: LoraFile
    size: str
    etag: str
    sha256: str
    problem: str

    def row(self) -> dict[str, str]:
        return {
            "style": self.style,
            "version": self.version,
            "layout": self.layout,
            "file": self.file.key.rsplit("/", 1)[-1],
            "size": self.size,
            "etag": self.etag,
            "sha256": self.sha256,
            "problem": self.problem,
        }


def _same_etag(a: str, b: str) -> bool:
    return a.strip('"') == b.strip('"')


def compare_file(store: ObjectStore, style: str, version: str, layout: str, f: LoraFile) -> FileComparison:
    """One recorded file against the store: size, ETag, header, declared SHA-256."""
    info = store.head(f.key)
    if info is None:
        return FileComparison(style, version, layout, f, str(f.size), "", "", "not in the store")
    problems = []
    size = str(f.size) if info.size == f.size else f"{f.size} → {info.size}"
    if info.size != f.size:
        problems.append("size differs")
    etag = "ok" if not f.etag or _same_etag(info.etag, f.etag) else f"{f.etag[:10]} → {info.etag[:10]}"
    if etag != "ok":
        problems.append("ETag differs (the file was replaced)")
    try:
        declared = read_header(store, f.key, size=info.size).checksum
    except InvalidLoraFile as exc:
        return FileComparison(style, version, layout, f, size, etag, "", f"header does not parse: {exc}")
    if not f.checksum:
        sha = "not recorded"
    elif declared == f.checksum:
        sha = "ok"
    else:
        sha = f"{f.checksum[:12]} → {(declared or 'none')[:12]}"
        problems.append("SHA-256 differs")
    return FileComparison(style, version, layout, f, size, etag, sha, "; ".join(problems))


def recorded_files(version: Version) -> dict[str, LoraFile]:
    """Every file the version records, by layout (a file recorded before layouts: ``main``)."""
    files = dict(version.files())
    if version.file is not None and all(f.key != version.file.key for f in files.values()):
        files["main"] = version.file
    return files


@dg.asset_check(
    asset="trained_lora",
    blocking=False,
    description="The latest completed version's files are in the store as the registry records them: size, "
    "ETag, a header that parses and the SHA-256 it declares.",
)
def lora_file_matches_registry(context: dg.AssetCheckExecutionContext, storage: StorageResource) -> dg.AssetCheckResult:
    store = storage.get_store()
    registry = RegistryStore(store)
    partition = context.run.tags.get(PARTITION_TAG)
    styles = [partition] if partition else sorted(registry.fresh_index(repair=False)[0].styles)
    compared: list[FileComparison] = []
    without = []
    for style in styles:
        version = registry.read(style)[0].latest_completed
        if version is None:
            without.append(style)
            continue
        compared += [
            compare_file(store, style, version.name, layout, f) for layout, f in sorted(recorded_files(version).items())
        ]
    bad = [c for c in compared if c.problem]
    if bad:
        description = (
            "; ".join(f"{c.style} {c.version} {c.layout} `{c.file.key}`: {c.problem}" for c in bad)
            + ". Run reconcile_registry to record the store's files again, or re-run the version's "
            "completion (docs/operations.md#re-running-a-completion)"
        )
    elif compared:
        description = f"{len(compared)} files of {len(styles) - len(without)} style(s) match the registry"
    else:
        description = "no completed version to compare"
    return dg.AssetCheckResult(
        passed=not bad,
        description=description,
        metadata={
            "files": dg.MetadataValue.table(records=[dg.TableRecord(c.row()) for c in compared], schema=FILES_SCHEMA),
            "mismatches": dg.MetadataValue.int(len(bad)),
        },
    )
