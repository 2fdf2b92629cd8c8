"""Training datasets: ingest, validate, version and store a style's images and captions."""
