"""Open-AutoGLM Kernel plugin for alerts: email over SMTP and signed JSON webhooks.

Layering, bottom up: ``settings`` (typed config), ``rules`` (the pure rule engine and rate
limiter), ``templates`` (``{file:...}`` messages), ``channels`` (SMTP and webhook delivery),
``plugin`` (the ``alerts.send`` action, the event subscriber and the hooks). Importing this
package does nothing.
"""

from .channels import EmailChannel, Outgoing, WebhookChannel, sign
from .plugin import AlertsPlugin, AlertSubscriber
from .rules import Alert, Engine, RateLimiter
from .settings import SendPayload, Settings
from .signing import WebhookVerificationError, verify

__all__ = [
    "Alert",
    "AlertSubscriber",
    "AlertsPlugin",
    "EmailChannel",
    "Engine",
    "Outgoing",
    "RateLimiter",
    "SendPayload",
    "Settings",
    "WebhookChannel",
    "WebhookVerificationError",
    "sign",
    "verify",
]
