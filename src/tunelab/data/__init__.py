"""Data: sources (files, hub, bundled) -> canonical rows (formats) -> token ids and loss masks."""
