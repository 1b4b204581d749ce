"""Evaluation sets: a release's small JSONL test of behaviour, run through the real engine before it commits.

Pure code, no I/O beyond reading the file (:mod:`~edgert.evalset.cases`: the format and its loading with
line-numbered errors; :mod:`~edgert.evalset.checks`: the checks and the score). It imports nothing of
serving, the engine, the update path or the transports: the device runs a set through the
:class:`~edgert.update.switch.ModelSwitch` seam (:mod:`edgert.serving.evaluation` drives the engine),
``edgert eval`` runs the same code locally, and ``edgert registry add --eval`` validates it before signing.
"""
