"""Transformer-M (ICLR 2023) as a fairseq plugin."""
