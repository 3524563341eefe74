"""The core every process shares: settings, the record contract, the pipeline config,
database access, the inbox and its migrations, windows of records, and two small helpers
(timestamps, waiting). It imports no other part of the project; the `ingest` command line
is the subpackage ingest/cli/, the only part that imports every side."""
