"""What the orchestrator, the training backends, the webhook and the worker exchange.

``training``: the training request and result; ``job_status``: RunPod's status body and the
registry evidence it becomes. Pydantic only: no Dagster, no boto3, no HTTP client, no torch.
"""
