"""The QueueStore contract suite (a package so that its conftest is `contract.conftest`,
not a second top-level `conftest` module shadowing tests/conftest.py)."""
