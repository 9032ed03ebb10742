"""The import sync: bucket listings become tasks (engine.py), run as jobs by workers (worker.py)."""
