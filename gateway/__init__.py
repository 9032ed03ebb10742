"""A JWT-checking media gateway in front of Google Cloud Storage."""

__version__ = "0.1.0"
