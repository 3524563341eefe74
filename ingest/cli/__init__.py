"""The `ingest` command line: main.py builds the Typer app from one module per command group.

The only part of the project that may import every side (consumers/, flows/, the core).
Heavy imports (Prefect, the consumers, the flows) happen inside the commands that need
them, so `ingest --help` and `ingest schema` stay fast.
"""
