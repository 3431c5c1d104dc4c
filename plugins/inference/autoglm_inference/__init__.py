"""Open-AutoGLM Kernel plugin for OpenAI-compatible model servers (vLLM, llama.cpp, TGI...).

Layering, bottom up: ``settings`` (typed config and payloads), ``templates`` (prompt
rendering, files read at run time), ``client`` (HTTP, SSE and the error mapping), ``batch``
(resumable JSONL batches), ``plugin`` (the three actions and the hook). Importing this package
does nothing; the kernel loads ``autoglm_inference.plugin`` through its entry point.
"""

from .client import ChatResult, Endpoint, OpenAIClient
from .settings import BatchPayload, ChatPayload, EmbedPayload, Settings

__all__ = [
    "BatchPayload",
    "ChatPayload",
    "ChatResult",
    "EmbedPayload",
    "Endpoint",
    "OpenAIClient",
    "Settings",
]
