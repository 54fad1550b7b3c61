"""The asyncio shell for inbound mail: listeners, sessions, TLS, AUTH."""
