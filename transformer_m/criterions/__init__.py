"""Registered fairseq criterions."""
from .graph_prediction import GraphPredictionCriterion, GraphPredictionCriterionConfig

__all__ = ["GraphPredictionCriterion", "GraphPredictionCriterionConfig"]
