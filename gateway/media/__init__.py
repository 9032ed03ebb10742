"""The media decision core (core.py), its answers (answers.py) and the I/O both lanes share (service.py)."""
