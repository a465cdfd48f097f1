"""Datasets of this plugin's models."""
