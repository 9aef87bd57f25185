"""RealSyn data engine core: Dagster-free algorithms, schemas and storage.

Heavy libraries (torch, faiss, open_clip, transformers) are imported lazily inside
the functions that need them, so importing this package is cheap.
"""

__version__ = "0.1.0"
