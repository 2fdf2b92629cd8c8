"""The app's HTTP API (``lora-pipeline api serve``): uploads, trainings, versions, downloads,
signed callbacks and the admin operations, for a dashboard that knows only its URL and token."""
