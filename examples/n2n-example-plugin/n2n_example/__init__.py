"""An example n2n plug-in: the ``pixels`` expert family and the ``blocks`` dataset.

n2n finds them through the entry points in this distribution's pyproject.toml and imports a module
only when its name is used, so this package imports nothing itself.
"""
