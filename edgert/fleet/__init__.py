"""Operator-side fleet operations: read the broker's retained device state, compare versions, roll out.

Nothing here serves or loads a model: it imports the MQTT payload schemas, the MQTT client adapter and
the operator registry, never serving, the engine or the daemon (an import-linter contract holds that).
"""
