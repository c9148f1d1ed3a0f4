"""The database side: schema and migrations, read-only queries, the experiment record, the
per-experiment lock, backups, and ingest of the data file into `source_narratives`.

Result rows are not written here: the pipeline's writer is their only writer.
"""
