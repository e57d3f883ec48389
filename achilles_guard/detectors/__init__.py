"""Detectors: checks of a checkpoint or a running model against a fingerprint."""
