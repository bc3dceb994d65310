"""The hand-written TensorBoard event files parse as Event protos, with correct TFRecord checksums,
and writing them imports neither PyTorch nor a writer library."""
import os
import struct
import subprocess
import sys

import google_crc32c
import numpy as np
import pytest

from pilaf_jax import tensorboard_events

# tensorboardX's protos (and protobuf) are imported for this file's tests only, not when the suite is
# collected.
event_pb2 = None


@pytest.fixture(autouse=True, scope='module')
def _event_protos():
  global event_pb2
  from tensorboardX.proto import event_pb2  # pylint: disable=redefined-outer-name,import-outside-toplevel


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _records(path):
  """TFRecord payloads, each checksum checked against an independent CRC-32C."""
  def masked(data):
    crc = int.from_bytes(google_crc32c.Checksum(data).digest(), 'big')
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
  data, out, i = open(path, 'rb').read(), [], 0
  while i < len(data):
    length_bytes = data[i:i + 8]
    (length,), (length_crc,) = struct.unpack('<Q', length_bytes), struct.unpack('<I', data[i + 8:i + 12])
    payload = data[i + 12:i + 12 + length]
    (payload_crc,) = struct.unpack('<I', data[i + 12 + length:i + 16 + length])
    assert length_crc == masked(length_bytes) and payload_crc == masked(payload)
    out.append(payload)
    i += 16 + length
  assert i == len(data)
  return out


def test_crc32c_check_values():
  assert tensorboard_events.crc32c(b'123456789') == 0xE3069283  # The standard check value.
  rng = np.random.default_rng(0)
  for n in (0, 1, 7, 100, 1000):
    data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    assert tensorboard_events.crc32c(data) == int.from_bytes(google_crc32c.Checksum(data).digest(), 'big')


def test_scalars_parse_as_event_protos(tmp_path):
  writer = tensorboard_events.ScalarEventWriter(str(tmp_path))
  values = [('J', 0.703125, 0), ('train/dpo_loss', -1.5e-7, 3), ('labels_used', 320.0, 2**40),
            ('time/sample_s', float('inf'), -2), ('overflow', -1e40, 5), ('nan', float('nan'), 6)]
  for tag, value, step in values:
    writer.add_scalar(tag, value, step)
  writer.close()
  (name,) = os.listdir(tmp_path)
  assert name.startswith('events.out.tfevents.')
  events = [event_pb2.Event.FromString(r) for r in _records(os.path.join(tmp_path, name))]
  assert events[0].file_version == 'brain.Event:2' and events[0].wall_time > 1.6e9
  assert len(events) == 1 + len(values)
  for event, (tag, value, step) in zip(events[1:], values):
    (entry,) = event.summary.value
    assert (entry.tag, event.step) == (tag, step)
    if np.isnan(value):
      assert np.isnan(entry.simple_value)
    else:
      assert entry.simple_value == (np.float32(value) if abs(value) < 1e38 else np.copysign(np.inf, value))
    assert abs(event.wall_time - events[0].wall_time) < 60


def test_writers_opened_together_get_their_own_files(tmp_path):
  writers = [tensorboard_events.ScalarEventWriter(str(tmp_path)) for _ in range(3)]
  for i, w in enumerate(writers):
    w.add_scalar('x', float(i), i)
    w.close()
  assert len({w.path for w in writers}) == 3 and len(os.listdir(tmp_path)) == 3
  for i, w in enumerate(writers):
    (event,) = [event_pb2.Event.FromString(r) for r in _records(w.path)][1:]
    assert (event.step, event.summary.value[0].simple_value) == (i, float(i))


def test_metrics_writer_logs_without_importing_torch(tmp_path):
  code = (f'import sys; sys.path.insert(0, {REPO!r})\n'
          'from pilaf_jax.metrics_writer import MetricsWriter\n'
          f'w = MetricsWriter({str(tmp_path)!r})\n'
          'w.write({"J": 1.25, "step": 4, "note": "x"}, 4); w.scalars({"dpo_loss": 0.5}, 4); w.close()\n'
          'assert "torch" not in sys.modules and "tensorboardX" not in sys.modules, "heavy import"\n')
  proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  (name,) = os.listdir(tmp_path / 'tensorboard')
  events = [event_pb2.Event.FromString(r) for r in _records(str(tmp_path / 'tensorboard' / name))]
  logged = {(v.tag, e.step, v.simple_value) for e in events for v in e.summary.value}
  assert logged == {('J', 4, 1.25), ('step', 4, 4.0), ('train/dpo_loss', 4, 0.5)}
