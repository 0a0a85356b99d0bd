"""Registered fairseq criterions."""
from .affinity_regression import AffinityRegressionConfig, AffinityRegressionCriterion
from .graph_prediction import GraphPredictionCriterion, GraphPredictionCriterionConfig
from .geomformer_md17 import GeoMFormerMD17Criterion  # noqa: F401  (GeoMFormer criteria)
from .gsrd import GsrdEnergyForceCriterion, GsrdPretrainCriterion, GsrdQM9Criterion  # noqa: F401,E501
from .graph_prediction_qm9 import (
    GraphPredictionQM9Criterion,
    GraphPredictionQM9CriterionConfig,
)

__all__ = ["AffinityRegressionConfig", "AffinityRegressionCriterion",
           "GraphPredictionCriterion", "GraphPredictionCriterionConfig",
           "GraphPredictionQM9Criterion", "GraphPredictionQM9CriterionConfig"]
