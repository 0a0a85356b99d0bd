"""Transformer-M (ICLR 2023) as a fairseq plugin: ``--user-dir <this directory>``.

Importing this package registers the task ``graph_prediction``, the criterion
``graph_prediction``, the model ``Transformer-M``, the architectures ``transformer_m``,
``transformer_m_base`` and ``transformer_m_small``, and the optimizer ``fused_adam``. It also
routes fairseq's checkpoint reads (``--restore-file``, ``--finetune-from-model``,
``fairseq-validate --path``, ...) through the project's weights-only loader
(:mod:`transformer_m.checkpoint`); that has to happen here, because ``fairseq-validate`` opens its
checkpoint before any task or model of ours is built. Its progress bars print the metrics that
stay on the device during training like floats (:mod:`transformer_m.criterions.lazy_metrics`).
"""
from . import checkpoint, criterions, models, optim, tasks  # noqa: F401  (registration)

checkpoint.install_fairseq_loader()
criterions.lazy_metrics.install_log_format()  # tensors logged lazily print like floats

__all__ = ["checkpoint", "criterions", "models", "optim", "tasks"]
