"""The Dagster layer: thin wrappers that wire resources to the domain and report metadata.

Loaded by ``dg.load_from_defs_folder`` from ``lora_pipeline/definitions.py``.
"""
