"""The HTTP API room: routes, OpenAPI document and bearer-token auth, run as a kernel service.

``server`` holds the aiohttp application and :func:`api_service`; ``schemas`` the msgspec
request and response Structs; ``openapi`` the route table and the OpenAPI 3.1 document built
from it. The API calls only the kernel's public methods (see ``kernel.app.Kernel``).
"""

from __future__ import annotations

from .server import api_service

__all__ = ["api_service"]
