"""The registry domain: pure Python, no Dagster, no boto3."""
