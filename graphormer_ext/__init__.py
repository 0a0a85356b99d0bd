"""Fairseq-free Graphormer-lineage data infrastructure: featurize -> paths -> LMDB -> collate."""

__version__ = "0.1.0"
