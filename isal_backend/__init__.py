"""isal-backend: a Label Studio ML backend that serves the most influential images first."""
__version__ = "0.1.0"
