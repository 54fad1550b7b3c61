"""Interop tests: Gannet against real third-party peers (tests/peers.py starts them)."""
