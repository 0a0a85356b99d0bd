"""Registered fairseq tasks."""
from .graph_prediction import GraphPredictionConfig, GraphPredictionTask

__all__ = ["GraphPredictionConfig", "GraphPredictionTask"]
