"""Annotation export to target storages: the outbox (registry/outbox.py) drained by ExportWorker."""
