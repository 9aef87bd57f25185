"""Dagster assets of the RealSyn graph: thin wiring around realsyn.stages, one module per stage.

Nothing is imported here, so `realsyn` commands that need no Dagster (text, metaclip) stay light;
`definitions.py` collects the assets.
"""
