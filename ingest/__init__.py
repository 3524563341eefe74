"""What every part of the ingestion system shares: settings, the record contract, database
access and migrations, the pipeline config, and the `ingest` command line."""
