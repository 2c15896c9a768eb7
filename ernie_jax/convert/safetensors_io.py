"""Minimal safetensors reader/writer over numpy + ml_dtypes (bf16 included), zero-copy reads.

Format: u64 little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}},
then the raw little-endian tensor bytes. Reading memory-maps the file, so a tensor costs memory
only when it is copied; truncated or corrupt files raise CheckpointError naming file and tensor.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

from ernie_jax.errors import CheckpointError

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


class SafetensorsFile:
    """Lazy view of one .safetensors file: `keys()`, `shape(name)`, `get(name)` -> np.ndarray view."""

    def __init__(self, path: str):
        self.path = path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n <= 0 or 8 + n > size:
                    raise ValueError(f"header length {n} does not fit in a {size}-byte file")
                header = json.loads(f.read(n))
        except (OSError, ValueError, struct.error) as e:
            raise CheckpointError(
                f"{path} is not a readable safetensors file ({e}); re-download or re-export it"
            ) from None
        header.pop("__metadata__", None)
        self._header = header
        self._data_start = 8 + n
        end = max((v["data_offsets"][1] for v in header.values()), default=0)
        if self._data_start + end > size:
            raise CheckpointError(
                f"{path} is truncated: header promises {self._data_start + end} bytes, file has "
                f"{size}; re-download or re-export it"
            )
        self._map = np.memmap(path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)

    def keys(self):
        return self._header.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._header[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        info = self._header[name]
        if info["dtype"] not in _DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        raw = self._map[self._data_start + begin : self._data_start + end]
        dtype = np.dtype(_DTYPES[info["dtype"]])
        if raw.size != dtype.itemsize * int(np.prod(info["shape"], dtype=np.int64)):
            raise CheckpointError(
                f"{self.path}: tensor {name} has {raw.size} bytes, which does not match its shape "
                f"{info['shape']} and dtype {info['dtype']}; the file is corrupt"
            )
        return raw.view(dtype).reshape(info["shape"])


def save_file(tensors: dict[str, np.ndarray], path: str, metadata: dict[str, str] | None = None) -> None:
    """Write tensors (numpy, any supported dtype) to `path` in safetensors format."""
    header, offset = {}, 0
    arrays = {}
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        if a.dtype not in _NAMES:
            raise CheckpointError(f"cannot write tensor {name} of dtype {a.dtype} to safetensors")
        header[name] = {
            "dtype": _NAMES[a.dtype],
            "shape": list(a.shape),
            "data_offsets": [offset, offset + a.nbytes],
        }
        arrays[name] = a
        offset += a.nbytes
    header["__metadata__"] = metadata or {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in sorted(arrays):
            f.write(arrays[name].tobytes(order="C"))
