"""Transformer-M (ICLR 2023) as a fairseq plugin: ``--user-dir <this directory>``.

Importing this package registers the task ``graph_prediction``, the criterion
``graph_prediction``, the model ``Transformer-M``, the architectures ``transformer_m``,
``transformer_m_base`` and ``transformer_m_small``, and the optimizer ``fused_adam``.
"""
from . import criterions, models, optim, tasks  # noqa: F401  (registration)

__all__ = ["criterions", "models", "optim", "tasks"]
