"""Process groups and collectives: bootstrap from torchrun, SLURM or MPI; torch.distributed and mpi4py comms.

Groups given by an engine are used as they are: point-to-point
:class:`~distload.transport.peer.PeerGroup` stands in for sub-groups there.

The only code that calls collectives. Every method of a
:class:`~distload.transport.comm.Comm` is called by all ranks of its group in
the same order, and failures are agreed (every rank raises the same
:class:`~distload.errors.DistLoadError`). Imports :mod:`distload.errors` and
the plan's :class:`~distload.plan.items.RankInfo`; knows nothing of models or files.
"""
