"""Unit tests of gannet.mailauth."""
