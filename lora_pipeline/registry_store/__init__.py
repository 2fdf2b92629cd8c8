"""The registry on an object store: documents with optimistic concurrency, the derived
index, submit claims, and LoRA files' headers read with ranged reads.

The rules themselves live in ``lora_pipeline.registry`` (pure); this package only reads and
writes them. Dagster-free.
"""
