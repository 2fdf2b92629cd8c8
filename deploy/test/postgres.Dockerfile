# Postgres for `make deploy-test` where the postgres:16 image cannot be pulled: Debian's
# postgresql-15 on the locally built base (base-image.sh), same variables and data path as the
# official image, so deploy/compose/docker-compose.yaml is used unchanged.
FROM lora-pipeline-base:bookworm-bare
RUN apt-get update -q \
 && apt-get install -y -q --no-install-recommends postgresql-15 \
 && rm -rf /var/lib/apt/lists/*
COPY postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint.sh
ENV PATH=/usr/lib/postgresql/15/bin:$PATH
EXPOSE 5432
CMD ["sh", "/usr/local/bin/postgres-entrypoint.sh"]
