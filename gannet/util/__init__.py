"""Generic, mail-agnostic helpers (files, buffers). Imports nothing from Gannet."""
