"""Converters: Hugging Face checkpoints and GGUF files -> .occ."""
