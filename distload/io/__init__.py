"""Moving tensor bytes between storage and memory: threaded reads into reusable buffers, the CUDA copy stage, writes.

Runs on the ranks that own files, locally (no collectives): readers fill
(pinned) buffers ahead of the transfer loop, writers stage and fsync a save's
files, and rank 0 commits it (:mod:`distload.io.commit`). Reads and opens go through :mod:`distload.storage`. Imports
:mod:`distload.storage`, :mod:`distload.format` and the plan's items.
"""
