"""Test doubles: the RunPod Serverless API server, and stub worker handlers."""
