"""Moving bytes between storage and memory: threaded reads into reusable buffers, the CUDA copy stage, writes.

Runs on the ranks that own files, locally: readers fill (pinned) buffers
ahead of the transfer loop, writers stage, fsync and commit a save. The
seam to storage (opening and reading byte ranges of a checkpoint's files)
lives here too, so the rest of distload never learns where bytes come from.
Imports :mod:`distload.errors` only.
"""
