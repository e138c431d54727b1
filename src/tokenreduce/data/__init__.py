"""Datasets used by tokenreduce benchmarks (built from offline packages: sklearn digits, skimage photographs,
gensim's Lee corpus). The cluttered-digits names are re-exported here."""

from . import digits as _digits
from .digits import *

__all__ = list(_digits.__all__)
