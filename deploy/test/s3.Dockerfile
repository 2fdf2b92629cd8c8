# An S3 server for `make deploy-test` where the MinIO image cannot be pulled: moto's server.
FROM lora-pipeline-base:bookworm-bare
RUN pip install -q --no-cache-dir "moto[server]==5.2.*"
EXPOSE 9000
CMD ["moto_server", "-H", "0.0.0.0", "-p", "9000"]
