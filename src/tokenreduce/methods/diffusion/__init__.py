"""Methods at the ``diffusion`` integration point (diffusers UNets and DiTs), one file each; importing the
package registers them."""

from .base import DIFFUSION, DiffusionMethod, MergeMethod, SiteCall, StrideMethod
from .pool import PoolMerge
from .random import RandomMerge
from .toca import ToCa
from .todo import ToDo
from .tofu import ToFu
from .tomesd import ToMeSD

__all__ = ["DIFFUSION", "DiffusionMethod", "MergeMethod", "PoolMerge", "RandomMerge", "SiteCall", "StrideMethod",
           "ToCa", "ToDo", "ToFu", "ToMeSD"]
