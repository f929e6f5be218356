"""gRPC metadata keys that the server and the SDK both use: one definition, so the two sides cannot drift."""

from __future__ import annotations

# Trailing metadata naming the request field (or limit) an error is about, for clients that want it without
# parsing the message.
FIELD_METADATA_KEY = "nvfp4-prep-field"
# The id that names one layer's request (and its retries) in both sides' logs; the SDK sends one per layer.
REQUEST_ID_KEY = "x-request-id"
# Carries "Bearer <token>" when the server wants a token (--auth-token-file).
AUTHORIZATION_KEY = "authorization"
# The fields that the server's concurrency refusals name: RESOURCE_EXHAUSTED errors that pass by themselves,
# and so the only ones a client should retry (with backoff).
MAX_CONCURRENT_FIELD = "max_concurrent"
MAX_CONCURRENT_PER_CLIENT_FIELD = "max_concurrent_per_client"
RETRYABLE_FIELDS = (MAX_CONCURRENT_FIELD, MAX_CONCURRENT_PER_CLIENT_FIELD)
