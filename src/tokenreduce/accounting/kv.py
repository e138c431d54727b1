"""KV-cache bytes counted from the tensors a cache really holds (not a mask over a full cache)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

__all__ = ["kv_bytes"]


def kv_bytes(cache: Any) -> dict[str, int]:
    """Bytes of the key/value tensors a cache really holds: ``storage`` (allocated storages, each counted once;
    a view into a larger tensor counts the whole storage) and ``tensor`` (elements x item size of the views)."""
    seen: set[int] = set()
    storage = tensor = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if t is None or not isinstance(t, Tensor) or t.numel() == 0:
                continue
            tensor += t.numel() * t.element_size()
            st = t.untyped_storage()
            if st.data_ptr() not in seen:
                seen.add(st.data_ptr())
                storage += st.nbytes()
    return {"storage": storage, "tensor": tensor}
