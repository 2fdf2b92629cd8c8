"""Tags on Dagster runs that other processes read: the contract between the training op,
which sets them, and the app's API (``lora_pipeline.api``), which follows its runs by them."""

# Set by train_lora's step once the version is claimed: the registry version the run trains.
VERSION_TAG = "lora_pipeline/version"
# Set by the API on the runs it launches: its training id (``api/trainings/<id>.json``).
API_TRAINING_TAG = "lora_pipeline/api_training"
# Dagster's own tag naming a partitioned run's partition (the style).
PARTITION_TAG = "dagster/partition"
