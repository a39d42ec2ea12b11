"""Nightly document processing through Anthropic's Message Batches API, at half the price."""

__version__ = "0.1.0"
