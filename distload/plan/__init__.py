"""What moves where: files -> ranks, DTensor slice math, key maps, the load, stream and save schedules, the dry run.

Pure and deterministic: plan items are frozen dataclasses, built by the
coordinator (rank 0) from headers and model metadata, sent to every rank,
and expanded by each rank into the same schedule. Nothing here reads tensor
data or calls a collective, so all of it is tested without processes.
Imports :mod:`distload.format` (and :mod:`distload.storage` for the dry run's
storage kind); never :mod:`distload.io`, :mod:`distload.transport` or :mod:`distload.model`.
"""
