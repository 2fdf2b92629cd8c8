"""The use cases of a LoRA's life, Dagster-free: submit a training and record its completion
(``submit``), settle the registry from every source (``reconcile``), clean the store
(``housekeeping``) and import the legacy dashboard's files (``legacy_import``).

The Dagster layer (``lora_pipeline.defs``) and the CLI call these.
"""
