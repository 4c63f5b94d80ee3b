"""The one transfer loop: every rank walks the plan's schedule of broadcast, scatter and slice steps.

(all ranks) Owners read through :mod:`distload.io`, bytes travel through
:mod:`distload.transport`, and land through the model's placement
(:mod:`distload.model`); gathered conversions run on their op rank after the
main transfer. Called by the drivers (:mod:`distload.loader`), never by users.
"""
