"""The rules of a Dense-Sparse-Dense run, which import torch only (no Lightning, no transformers).

:mod:`~lightning_dsd.rules.engine` owns a run; the modules below it each decide one thing: the options and
their checks (:mod:`~lightning_dsd.rules.options`), the phases (:mod:`~lightning_dsd.rules.phases`), which
parameters are targets (:mod:`~lightning_dsd.rules.selection`), the masks (:mod:`~lightning_dsd.rules.plan`,
:mod:`~lightning_dsd.rules.masks`), the criterion that ranks weights (:mod:`~lightning_dsd.rules.importance`),
keeping pruned weights at zero (:mod:`~lightning_dsd.rules.constraint`), the learning-rate drop
(:mod:`~lightning_dsd.rules.lr`), the re-dense restart (:mod:`~lightning_dsd.rules.redense`), distributed
primitives (:mod:`~lightning_dsd.rules.sharding`), the checkpoint state (:mod:`~lightning_dsd.rules.state`),
the checks before training (:mod:`~lightning_dsd.rules.preflight`), what is reported
(:mod:`~lightning_dsd.rules.reporting`, :mod:`~lightning_dsd.rules.figure`), where it goes
(:mod:`~lightning_dsd.rules.sinks`) and how it is said
(:mod:`~lightning_dsd.rules.log`).
"""
