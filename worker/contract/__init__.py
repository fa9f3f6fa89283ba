"""The job contract shared by the API (service/) and the worker processes (worker/).

It owns what both sides must agree on: the Redis connection settings, the key names, how a job is
enqueued and read back (rq's public API only), the blob store for inputs and results, the model
cache and the telemetry records. The service imports this package and never rq itself.
"""
