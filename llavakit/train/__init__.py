"""Training: both LLaVA stages on transformers' Trainer, with the original flag names."""
