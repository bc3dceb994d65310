"""A GGUF file's header, metadata and tensor table, parsed once with plain `struct` reads.

gguf.GGUFReader builds a numpy view for every part of every metadata value, which for a vocabulary of
49k tokens and 49k merges takes seconds; here each string is one slice of a memory map, and the
parsed result is cached per file (path, size, modification time), so the model loader, the config
reader and the tokenizer share one parse. Tensor data is not read: `tensor_data` returns a memory-
mapped view shaped as gguf.quants.dequantize expects.

Layout (llama.cpp's gguf.h, versions 2 and 3; little-endian, or big-endian when the version reads
byte-swapped):

    magic 'GGUF' | u32 version | u64 tensor_count | u64 kv_count
    kv_count x   (string key, u32 value type, value)
    tensor_count x (string name, u32 n_dims, n_dims x u64 dim (fastest first), u32 ggml type,
                    u64 offset into the data section)
    padding to general.alignment (default 32) | tensor data

where a string is a u64 byte length and UTF-8 bytes, and an array value is u32 element type,
u64 count and the elements.
"""
from __future__ import annotations

import dataclasses
import functools
import mmap
import os
import struct
from typing import Any

import numpy as np

from pilaf_jax.model.checkpoint_info import CheckpointError

# Metadata value types (gguf.GGUFValueType): struct format of the fixed-size ones.
_SCALAR_FORMATS = {0: 'B', 1: 'b', 2: 'H', 3: 'h', 4: 'I', 5: 'i', 6: 'f', 7: '?', 10: 'Q', 11: 'q',
                   12: 'd'}
_STRING, _ARRAY = 8, 9
_NUMPY_KINDS = {'B': 'u1', 'b': 'i1', 'H': 'u2', 'h': 'i2', 'I': 'u4', 'i': 'i4', 'f': 'f4', '?': '?',
                'Q': 'u8', 'q': 'i8', 'd': 'f8'}
_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32


class _Truncated(Exception):
  """A read past the end of the file."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """One entry of the tensor table. shape is GGUF's dimension list (fastest-moving first)."""
  name: str
  shape: tuple[int, ...]
  tensor_type: int  # A gguf.GGMLQuantizationType value.
  offset: int  # Absolute, from the start of the file.


@dataclasses.dataclass(frozen=True)
class GGUFFile:
  """A GGUF file's metadata (key -> Python value; arrays as lists) and tensor table."""
  path: str
  version: int
  metadata: dict[str, Any]
  tensors: tuple[TensorInfo, ...]
  byte_order: str  # '<' or '>'.

  def get(self, key: str, default: Any = None) -> Any:
    return self.metadata.get(key, default)

  @functools.cached_property
  def tensors_by_name(self) -> dict[str, TensorInfo]:
    return {t.name: t for t in self.tensors}


class _Cursor:
  """Sequential little- or big-endian reads from a buffer, raising _Truncated past its end."""

  def __init__(self, buf, byte_order: str):
    self.buf, self.pos, self.order, self.size = buf, 0, byte_order, len(buf)

  def take(self, n: int) -> int:
    start = self.pos
    if n < 0 or start + n > self.size:
      raise _Truncated()
    self.pos = start + n
    return start

  def scalar(self, fmt: str):
    start = self.take(struct.calcsize(fmt))
    return struct.unpack_from(self.order + fmt, self.buf, start)[0]

  def string(self) -> str:
    n = self.scalar('Q')
    start = self.take(n)
    return self.buf[start:start + n].decode('utf-8')

  def value(self, value_type: int) -> Any:
    if value_type in _SCALAR_FORMATS:
      return self.scalar(_SCALAR_FORMATS[value_type])
    if value_type == _STRING:
      return self.string()
    if value_type == _ARRAY:
      element_type, count = self.scalar('I'), self.scalar('Q')
      if element_type in _SCALAR_FORMATS:
        kind = _NUMPY_KINDS[_SCALAR_FORMATS[element_type]]
        dtype = np.dtype(kind if kind in ('u1', 'i1', '?') else self.order + kind)
        start = self.take(count * dtype.itemsize)
        return np.frombuffer(self.buf, dtype, count, start).tolist()
      if element_type == _STRING:
        return self._strings(count)
      return [self.value(element_type) for _ in range(count)]  # Arrays of arrays (rare).
    raise ValueError(f'unknown metadata value type {value_type}')

  def _strings(self, count: int) -> list[str]:
    """`count` strings: the hot loop of a vocabulary, kept to one unpack and one slice each."""
    buf, pos, size = self.buf, self.pos, self.size
    length_of = struct.Struct(self.order + 'Q').unpack_from
    out = []
    append = out.append
    for _ in range(count):
      if pos + 8 > size:
        raise _Truncated()
      n = length_of(buf, pos)[0]
      pos += 8
      if pos + n > size:
        raise _Truncated()
      append(buf[pos:pos + n].decode('utf-8'))
      pos += n
    self.pos = pos
    return out


def _bad(path: str, why: str) -> CheckpointError:
  return CheckpointError(f'{path}: not a readable GGUF file ({why}); expected a llama.cpp GGUF '
                         'model file.')


def _parse(path: str) -> GGUFFile:
  if not os.path.isfile(path):
    raise CheckpointError(f'{path}: no such file; expected a GGUF file (e.g. model.Q4_1.gguf).')
  with open(path, 'rb') as f:
    magic = f.read(4)
    if magic != b'GGUF':
      raise CheckpointError(f'{path}: not a readable GGUF file (starts with {magic!r}, not b"GGUF"); '
                            'expected a llama.cpp GGUF model file.')
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
      # Copy the bytes out of the map only as strings: struct and numpy read the map directly.
      try:
        return _parse_buffer(path, mapped)
      except _Truncated:
        raise _bad(path, 'it ends inside its header') from None
      except (ValueError, UnicodeDecodeError, OverflowError, struct.error) as e:
        raise _bad(path, f'{type(e).__name__}: {e}') from None


def _parse_buffer(path: str, buf) -> GGUFFile:
  cursor = _Cursor(buf, '<')
  cursor.take(4)
  version = cursor.scalar('I')
  if version & 0xFFFF == 0:  # A big-endian file read little-endian: 3 reads as 0x03000000.
    cursor.order = '>'
    version = struct.unpack('>I', struct.pack('<I', version))[0]
  if version not in _VERSIONS:
    raise ValueError(f'GGUF version {version}; versions {_VERSIONS} are supported')
  tensor_count, kv_count = cursor.scalar('Q'), cursor.scalar('Q')
  metadata: dict[str, Any] = {}
  for _ in range(kv_count):
    key = cursor.string()
    metadata[key] = cursor.value(cursor.scalar('I'))
  entries = []
  for _ in range(tensor_count):
    name = cursor.string()
    n_dims = cursor.scalar('I')
    shape = tuple(cursor.scalar('Q') for _ in range(n_dims))
    entries.append((name, shape, cursor.scalar('I'), cursor.scalar('Q')))
  alignment = int(metadata.get('general.alignment', DEFAULT_ALIGNMENT))
  data_start = -(-cursor.pos // alignment) * alignment
  names = [name for name, *_ in entries]
  if len(set(names)) != len(names):
    raise ValueError('a tensor name appears twice')
  tensors = tuple(TensorInfo(name, shape, tensor_type, data_start + offset)
                  for name, shape, tensor_type, offset in entries)
  return GGUFFile(path=path, version=version, metadata=metadata, tensors=tensors,
                  byte_order=cursor.order)


@functools.lru_cache(maxsize=4)
def _cached(path: str, size: int, mtime_ns: int) -> GGUFFile:
  del size, mtime_ns  # Only the cache key: a rewritten file is parsed again.
  return _parse(path)


def read_gguf_file(path: str) -> GGUFFile:
  """The header, metadata and tensor table of the GGUF file at `path` (parsed once per file version).

  Raises a one-line CheckpointError for a missing file, a file that is not GGUF, or a truncated or
  malformed header.
  """
  path = os.path.abspath(path)
  try:
    stat = os.stat(path)
  except OSError:
    return _parse(path)  # Raises the missing-file error.
  return _cached(path, stat.st_size, stat.st_mtime_ns)


def tensor_data(file: GGUFFile, tensor: TensorInfo) -> np.ndarray:
  """A read-only memory-mapped view of one tensor's stored data, shaped as gguf.GGUFReader shapes it.

  Plain float and integer types come back typed with numpy's row-major shape (GGUF's dimensions
  reversed); block-quantised types (and BF16) as uint8 rows of bytes, which is what
  gguf.quants.dequantize takes.
  """
  from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
  from gguf.quants import quant_shape_to_byte_shape
  kind = GGMLQuantizationType(tensor.tensor_type)
  shape = tuple(reversed(tensor.shape))
  typed = {GGMLQuantizationType.F32: 'f4', GGMLQuantizationType.F16: 'f2',
           GGMLQuantizationType.F64: 'f8', GGMLQuantizationType.I8: 'i1',
           GGMLQuantizationType.I16: 'i2', GGMLQuantizationType.I32: 'i4',
           GGMLQuantizationType.I64: 'i8'}
  n_elements = int(np.prod(shape, dtype=np.int64))
  if kind in typed:
    dtype = np.dtype(file.byte_order + typed[kind] if typed[kind] != 'i1' else 'i1')
    count = n_elements
  else:
    block_size, type_size = GGML_QUANT_SIZES[kind]
    dtype, count = np.dtype(np.uint8), n_elements * type_size // block_size
    shape = quant_shape_to_byte_shape(shape, kind)
  if tensor.offset + count * dtype.itemsize > os.path.getsize(file.path):
    raise _bad(file.path, f'tensor {tensor.name!r} runs past the end of the file')
  return np.memmap(file.path, dtype=dtype, mode='r', offset=tensor.offset, shape=(count,)).reshape(shape)
