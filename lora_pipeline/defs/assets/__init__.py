"""The three assets of the flow: training_dataset → trained_lora → lora_registry."""
