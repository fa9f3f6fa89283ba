"""What a convq job is and how it runs: RQ job functions, the worker entry point, the blob store."""
