"""Finding a checkpoint and reading what it says: discovery, headers, the index, the dtype table.

Runs on one rank at a time, locally: the coordinator (rank 0) while planning,
and each file owner again before it reads (storage may differ between nodes).
Pure apart from reading header bytes through :mod:`distload.storage`; no
collectives, no model. Imports :mod:`distload.storage` and :mod:`distload.errors`.
"""
