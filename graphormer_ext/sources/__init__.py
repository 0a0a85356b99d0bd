"""Readers of official on-disk dataset layouts, each yielding :class:`SourceRecord` items."""
