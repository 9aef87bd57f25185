"""Stage runners: read a stage's inputs from storage, call the core algorithms, commit the output.

Each function is one asset's body, free of Dagster, so it can be run and tested alone. Asset
names used as storage folders are the Dagster asset keys.
"""
