"""Built-in methods; importing this package registers them (see ``tokenreduce.registry``)."""

from . import vision  # noqa: F401
