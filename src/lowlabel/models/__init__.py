"""Encoders, heads and encoder files."""
