"""Registered fairseq tasks."""
from .graph_prediction import GraphPredictionConfig, GraphPredictionTask
from .gsrd import GsrdMD17Task, GsrdPretrainTask, GsrdQM9Task  # noqa: F401  (3D-GSRD)
from .graph_prediction_qm9 import GraphPredictionQM9Config, GraphPredictionQM9Task

__all__ = ["GraphPredictionConfig", "GraphPredictionTask", "GraphPredictionQM9Config",
           "GraphPredictionQM9Task"]
