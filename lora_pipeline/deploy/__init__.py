"""Past one machine: Postgres-backed Dagster with separate processes (docs/deploy.md).

``postgres``: a Postgres server from the ``pgserver`` wheel's binaries (tests, ``make prod-local``);
``local``: the four processes of ``make prod-local`` started and stopped by process group;
``init``: what every deployment runs once before serving (pool limits, style partitions).
"""
