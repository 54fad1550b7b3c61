"""Interop tests: Gannet against real third-party peers (tests/peers/ starts them)."""
