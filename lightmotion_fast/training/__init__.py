"""Training helpers: `lion` trains a LiON-LoRA adapter and its scaling-token embedding."""
