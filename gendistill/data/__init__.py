"""Offline data sources."""
