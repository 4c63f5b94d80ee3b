"""Where checkpoint bytes live: local files (checked names, race-free opens, exact reads) and what storage holds them.

The lowest stage: used by :mod:`distload.format` to read headers and by
:mod:`distload.io` to read and write tensor data, on whichever rank opens a
file, locally. Imports :mod:`distload.errors` only.
"""
