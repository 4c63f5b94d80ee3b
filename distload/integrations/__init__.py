"""Adapters that plug distload into other programs (an inference engine's model loader).

Each is a thin adapter over distload's public streaming API, imported only by
the program it plugs into (through an entry point); nothing in distload's
core imports this package.
"""
