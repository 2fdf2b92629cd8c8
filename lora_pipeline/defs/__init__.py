"""The Dagster layer: thin wrappers that wire resources to the domain and report metadata.

A plain package of modules (assets, checks, jobs, sensors, schedules, resources,
partitions). Nothing loads it by convention: ``lora_pipeline/definitions.py`` imports
each object by name and lists it in the one ``dg.Definitions``, so an object not listed
there is not part of the code location.
"""
