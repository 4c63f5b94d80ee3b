"""Finding a checkpoint and reading what it says: discovery, headers, the index, the dtype table.

Runs on one rank at a time, locally: the coordinator (rank 0) while planning,
and each file owner again before it reads (storage may differ between nodes).
Pure apart from reading bytes through :mod:`distload.io`; no collectives, no
model. Imports :mod:`distload.io` and :mod:`distload.errors` only.
"""
