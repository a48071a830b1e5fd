"""Readers and writers of other formats: Hugging Face safetensors (hf.py), the Hub (hub.py), GGUF (gguf.py)."""
