"""The GPU worker: runs inside a RunPod Serverless worker (and in the local backend).

Imports no Dagster. Importing this package must stay light: torch, diffusers and
peft are imported only by the modules that train.
"""
