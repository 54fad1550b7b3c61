"""Gannet, a mail transfer agent. Importing gannet has no side effects."""

__version__ = "0.1.0"
