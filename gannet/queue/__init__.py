"""The durable queue: the QueueStore interface (store.py), its records
(model.py), queue IDs (ids.py) and the stores (sqlite.py; postgres.py later).

Importing this package imports nothing else; pick the module you need.
docs/queue.md describes the states, the commit protocol and the on-disk layout.
"""
