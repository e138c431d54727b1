"""Built-in methods; importing this package registers them (see ``tokenreduce.registry``)."""

from . import vision  # noqa: F401
from . import kv  # noqa: F401
from . import prompt, encoder  # noqa: F401
from . import vlm  # noqa: F401
