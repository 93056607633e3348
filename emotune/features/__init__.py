"""Frozen encoders, their catalog and the shared feature cache."""
