"""RunPod webhooks: a small ASGI receiver that turns each POST into an inbox file."""
