"""Datasets, record codec, LMDB reader/writer and the collator."""
