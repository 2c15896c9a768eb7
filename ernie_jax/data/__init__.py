"""Data: tokenizers, grain text pipelines with packing."""
