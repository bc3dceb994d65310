"""TensorBoard scalar event files, written directly: a TFRecord file of `Event` protocol buffers.

Only scalars are logged, and their encoding is small enough to write by hand (below). A writer
library would cost every run its imports: tensorboardX imports PyTorch when it is installed (over a
second per launch) and the Google Cloud client.

Record framing (TFRecord): uint64 length, uint32 masked CRC-32C of the length, the bytes, uint32
masked CRC-32C of the bytes, all little-endian. Event fields: 1 wall_time (double), 2 step (int64),
3 file_version (string), 5 summary (Summary), 7 session_log (SessionLog). Summary: 1 value (repeated
Summary.Value); Value: 1 tag (string), 2 simple_value (float). SessionLog: 1 status (enum; START = 1),
3 msg (string). A resumed run writes SessionLog START at the step it continues from: TensorBoard then
drops the interrupted run's points from that step on, instead of drawing them beside the new ones.
"""
from __future__ import annotations

import itertools
import os
import socket
import struct
import time

import numpy as np


def _crc32c_table() -> list[int]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    table.append(crc)
  return table


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli), the checksum TFRecord uses."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
  out = bytearray()
  n &= (1 << 64) - 1  # Negative int64s are ten-byte two's complement varints.
  while True:
    low, n = n & 0x7F, n >> 7
    out.append(low | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _bytes_field(number: int, payload: bytes) -> bytes:
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


START_STATUS = 1  # SessionLog's status START


def _event(wall_time: float, step: int, *, file_version: str = '', summary: bytes = b'',
           restart: bytes = b'') -> bytes:
  out = _varint(1 << 3 | 1) + struct.pack('<d', wall_time) + _varint(2 << 3 | 0) + _varint(step)
  if file_version:
    out += _bytes_field(3, file_version.encode())
  if summary:
    out += _bytes_field(5, summary)
  if restart:
    out += _bytes_field(7, restart)
  return out


def status_record(status: int, msg: str = '') -> bytes:
  """A SessionLog message (Event field 7): a status, and an optional note."""
  return _varint(1 << 3 | 0) + _varint(status) + (_bytes_field(3, msg.encode()) if msg else b'')


def scalar_summary(tag: str, value: float) -> bytes:
  """A Summary holding one scalar."""
  with np.errstate(over='ignore'):  # A finite value beyond float32's range is logged as +-inf.
    as_float32 = np.asarray(value, '<f4').tobytes()
  entry = _bytes_field(1, tag.encode()) + _varint(2 << 3 | 5) + as_float32
  return _bytes_field(1, entry)


def tfrecord(data: bytes) -> bytes:
  """One TFRecord: length, its masked CRC, the data, its masked CRC."""
  length = struct.pack('<Q', len(data))
  return length + struct.pack('<I', _masked_crc(length)) + data + struct.pack('<I', _masked_crc(data))


class ScalarEventWriter:
  """Appends scalars to a new events.out.tfevents.* file in logdir (the name TensorBoard looks for)."""

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    now = time.time()
    base = os.path.join(logdir, f'events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}')
    for i in itertools.count():  # A file of its own, even for two writers opened in the same second.
      self.path = base if i == 0 else f'{base}.{i}'
      try:
        self._file = open(self.path, 'xb')
        break
      except FileExistsError:
        continue
    self._file.write(tfrecord(_event(now, 0, file_version='brain.Event:2')))
    self.flush()

  def add_scalar(self, tag: str, value: float, step: int) -> None:
    self._file.write(tfrecord(_event(time.time(), int(step), summary=scalar_summary(tag, float(value)))))

  def add_restart_marker(self, step: int) -> None:
    """TensorBoard's restart marker: points of an earlier run at steps >= step are stale."""
    self._file.write(tfrecord(_event(time.time(), int(step), restart=status_record(
        START_STATUS, f'resumed at step {step}'))))
    self.flush()

  def flush(self) -> None:
    self._file.flush()

  def close(self) -> None:
    if not self._file.closed:
      self._file.close()
