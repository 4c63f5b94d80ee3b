"""The model side: meta init, materializing parameters (plain and DTensor), and writing bytes into place.

Runs on every rank, locally (no collectives): parameters get real memory
once, tied weights stay tied, and the :class:`~distload.model.place.Placement`
the transfer loop writes through resolves and commits bytes; on failure the
model goes back to meta. A stream's :class:`~distload.model.sink.StreamSink`
is a placement with no model. Also what a save reads from the model
(:mod:`distload.model.save_keys`). Imports :mod:`distload.format` and
:mod:`distload.plan`; never the transport.
"""
