"""Glue for RunPod's local test mode: ``python handler.py`` with nothing configured.

``test_input.json`` names the bundled sample dataset by its hash but no store, so
a fresh checkout can run one whole job: when ``LORA_STORAGE_URL`` is unset this
makes a temporary local store and ingests the bundled sample into it, the same
way ``lora-pipeline dataset add`` would. On a deployed worker the variable is set
and this does nothing.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from lora_pipeline.settings import Settings

SAMPLE_STYLE = "sample_style"


def prepare_local_store(settings: Settings) -> str:
    """Return the storage URL jobs will use; create and fill a temporary one if none is set
    (and set LORA_STORAGE_URL to it in this process, where the handler reads it)."""
    if settings.storage_url_is_set:
        return settings.storage_url
    root = Path(tempfile.mkdtemp(prefix="lora-pipeline-local-test-"))
    ingest_sample(str(root))
    os.environ["LORA_STORAGE_URL"] = str(root)
    return str(root)


def ingest_sample(url: str) -> str:
    """Ingest the bundled sample into the store at ``url``; returns the dataset hash."""
    from lora_pipeline.dataset.ingest import (
        SAMPLE_TRIGGER_WORD,
        IngestOptions,
        ingest_dataset,
        sample_dataset_path,
    )
    from lora_pipeline.storage.factory import open_store

    report = ingest_dataset(
        open_store(url),
        SAMPLE_STYLE,
        sample_dataset_path(),
        options=IngestOptions(trigger_word=SAMPLE_TRIGGER_WORD),
    )
    assert report.manifest is not None, "the bundled sample always ingests"
    return report.manifest.dataset_hash
