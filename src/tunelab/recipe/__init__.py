"""Recipes: the YAML schema, loading (extends, --set, ${env:...}) and lock files."""
