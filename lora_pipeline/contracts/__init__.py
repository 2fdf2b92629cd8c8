"""What the orchestrator, the training backends, the webhook and the worker exchange.

``training``: the training request and result; ``job_status``: RunPod's status body and the
registry evidence it becomes; ``run_tags``: the Dagster run tags the app's API follows runs by. Pydantic only: no Dagster, no boto3, no HTTP client, no torch.
"""
