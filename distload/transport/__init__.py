"""Process groups and collectives: bootstrap from torchrun, SLURM or MPI; torch.distributed and mpi4py comms.

Groups given by an engine are used as they are: scatters are point-to-point
messages over the given group, so distload makes no sub-group of its own.

The only code that calls collectives. Every method of a
:class:`~distload.transport.comm.Comm` is called by all ranks of its group in
the same order, and failures are agreed (every rank raises the same
:class:`~distload.errors.DistLoadError`). Imports :mod:`distload.errors` and
the plan's :class:`~distload.plan.items.RankInfo`; knows nothing of models or files.
"""
