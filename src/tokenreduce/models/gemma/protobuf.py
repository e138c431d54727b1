"""A minimal protobuf writer/reader (wire format), enough for sentencepiece's ``ModelProto``: the ``protobuf``
package (needed by ``sentencepiece_model_pb2`` and by transformers' own ``tokenizer.model`` converter) is
not installed in this environment."""

from __future__ import annotations

import struct

__all__ = ["pb_bytes", "pb_fields", "pb_float", "pb_int", "read_varint", "varint"]


def varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int32 -> 10-byte two's complement, as protobuf does
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def pb_int(field: int, value: int) -> bytes:
    return varint(field << 3) + varint(int(value))


def pb_bytes(field: int, value: bytes | str) -> bytes:
    if isinstance(value, str):
        value = value.encode("utf-8")
    return varint((field << 3) | 2) + varint(len(value)) + value


def pb_float(field: int, value: float) -> bytes:
    return varint((field << 3) | 5) + struct.pack("<f", value)


def pb_fields(data: bytes):
    """Yield (field_number, wire_type, value) for a serialized message."""
    i, n = 0, len(data)
    while i < n:
        key, i = read_varint(data, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = read_varint(data, i)
        elif wire == 2:
            length, i = read_varint(data, i)
            value, i = data[i : i + length], i + length
        elif wire == 5:
            value, i = data[i : i + 4], i + 4
        elif wire == 1:
            value, i = data[i : i + 8], i + 8
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field, wire, value


def read_varint(data: bytes, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[i]
        i += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return result, i
