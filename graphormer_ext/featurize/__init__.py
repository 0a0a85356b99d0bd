"""Molecule -> dict of numpy arrays (pure functions; RDKit adapters)."""
