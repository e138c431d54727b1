"""Built-in methods; importing this package registers them (see ``tokenreduce.registry``).

The import order is the registration order, which is the order ``tr.methods()`` lists them in."""
# ruff: noqa: I001

from . import vision  # noqa: F401
from . import kv  # noqa: F401
from . import prompt, encoder  # noqa: F401
from . import vlm  # noqa: F401
