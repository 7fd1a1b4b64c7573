"""Params to Ray Train jobs: job configs and run names, launch (local or a cluster), inputs through the object store, checkpoint storage, the metrics sink, in-worker helpers."""
