"""fedcxr: federated learning for chest X-ray diagnosis, built as a DVC pipeline."""

__version__ = "0.1.0"
