"""Registered fairseq tasks."""
from .graph_prediction import GraphPredictionConfig, GraphPredictionTask
from .geomformer_md17 import GeoMFormerGraphPredictionTask, GeoMFormerMD17Task  # noqa: F401
from .geomformer_nbody import GeoMFormerNBodyTask  # noqa: F401  (GeoMFormer)
from .gsrd import GsrdMD17Task, GsrdPretrainTask, GsrdQM9Task  # noqa: F401  (3D-GSRD)
from .graph_prediction_qm9 import GraphPredictionQM9Config, GraphPredictionQM9Task

__all__ = ["GraphPredictionConfig", "GraphPredictionTask", "GraphPredictionQM9Config",
           "GraphPredictionQM9Task"]
