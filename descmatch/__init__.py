"""descmatch: local feature extraction and matching with learned patch descriptors."""

__version__ = "0.1.0"

__all__ = ["__version__"]
