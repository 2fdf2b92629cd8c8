"""Training backends: RunPod Serverless over HTTP, and a local one that runs the worker here.

Dagster-free building blocks (``base``: the protocol, policy and errors; ``runpod_client``;
``local`` with its job process ``local_runner`` and state ``local_state``; ``factory``;
``poll``); the Dagster layer wraps them in resources, ops and sensors.
"""
