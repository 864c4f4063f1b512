"""Shipped YAML recipes (package data); see flarectl.config."""
