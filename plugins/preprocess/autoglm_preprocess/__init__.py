"""Open-AutoGLM Kernel plugin that turns text, JSONL and CSV files into JSONL chunks.

Layering, bottom up: ``text`` (pure normalisation, hashing, chunking), ``readers`` (documents
out of files), ``prepare`` (the pipeline and its atomic, idempotent output), ``plugin`` (the
``preprocess.prepare`` action and the hook). Importing this package does nothing.
"""

from .prepare import Record, Report, prepare
from .settings import PreparePayload, Settings
from .text import chunk, count_tokens, normalise

__all__ = [
    "PreparePayload",
    "Record",
    "Report",
    "Settings",
    "chunk",
    "count_tokens",
    "normalise",
    "prepare",
]
