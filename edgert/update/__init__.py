"""Device side of signed model delivery: check, download, stage, activate, health-check, commit.

See :mod:`edgert.update.orchestrator` for the flow and :mod:`edgert.update.state`
for the persisted state machine. Importing this package loads nothing heavy.
"""
