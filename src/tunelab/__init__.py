"""tunelab: a fine-tuning toolkit for the Hugging Face ecosystem, driven by YAML recipes."""

__version__ = "0.1.0"
