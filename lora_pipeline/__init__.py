"""lora_pipeline: the whole life of style LoRAs as a Dagster data pipeline."""
