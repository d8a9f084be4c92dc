"""Read PyTorch weights into NumPy without torch and without running code from the file.

``load_state_dict(path)`` accepts ``.safetensors`` and torch's zip ``.pt``/``.pth``/``.bin`` format.
The pickle inside a ``.pt`` file is read by an unpickler that admits only what
``torch.load(weights_only=True)`` admits for a state dict: tensor rebuilds, storages and plain
containers. Anything else (``os.system``, arbitrary classes) raises ``UnsafeCheckpointError``
naming the offending global. A dict with a single ``"model"``/``"state_dict"`` entry (LlamaGen's
layout) is unwrapped with ``key=``. Every PyTorch converter in the project reads through here.
"""

import collections
import json
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
_SAFETENSORS_DTYPES = {
    "F32": np.float32, "F64": np.float64, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


class UnsafeCheckpointError(pickle.UnpicklingError):
  """The checkpoint's pickle asks for something a weights file never needs."""


def _rebuild_tensor(storage, offset, size, stride, *args):
  del args  # requires_grad, backward hooks, metadata
  item = storage.dtype.itemsize
  if not size:
    return storage[offset:offset + 1].reshape(()).copy()
  view = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                         strides=tuple(s * item for s in stride))
  return np.array(view)


def _rebuild_parameter(data, *args):
  del args
  return data


class _StorageType:
  def __init__(self, dtype):
    self.dtype = dtype


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "dict"): dict, ("builtins", "list"): list, ("builtins", "tuple"): tuple,
    ("builtins", "set"): set,
}


class _RestrictedUnpickler(pickle.Unpickler):
  def __init__(self, fileobj, zf, prefix):
    super().__init__(fileobj)
    self._zf, self._prefix = zf, prefix

  def find_class(self, module, name):
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(_STORAGE_DTYPES[name])
    raise UnsafeCheckpointError(
        f"refusing to load {module}.{name}: a weights file holds only tensors and plain "
        "containers, and loading this would run code from the file. Re-save the state dict "
        "(torch.save(model.state_dict(), path)) or convert it to .safetensors.")

  def persistent_load(self, pid):
    kind, storage_type, key, _location, numel = pid[:5]
    if kind != "storage" or not isinstance(storage_type, _StorageType):
      raise UnsafeCheckpointError(f"unexpected persistent id {pid!r}")
    raw = self._zf.read(f"{self._prefix}data/{key}")
    return np.frombuffer(raw, dtype=storage_type.dtype, count=numel)


def _load_pt(path):
  if not zipfile.is_zipfile(path):
    raise ValueError(f"{path}: not a torch zip checkpoint (legacy pre-1.6 .pt files are not "
                     "supported; re-save with a recent torch or convert to .safetensors)")
  with zipfile.ZipFile(path) as zf:
    pkl = [n for n in zf.namelist() if n.endswith("data.pkl")]
    if len(pkl) != 1:
      raise ValueError(f"{path}: expected one data.pkl in the archive, found {pkl}")
    prefix = pkl[0][: -len("data.pkl")]
    with zf.open(pkl[0]) as f:
      return _RestrictedUnpickler(f, zf, prefix).load()


def _load_safetensors(path):
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(n))
    data = f.read()
  out = {}
  for name, spec in header.items():
    if name == "__metadata__":
      continue
    start, end = spec["data_offsets"]
    dtype = _SAFETENSORS_DTYPES[spec["dtype"]]
    out[name] = np.frombuffer(data[start:end], dtype=dtype).reshape(spec["shape"]).copy()
  return out


def load_state_dict(path, key=None):
  """{name: np.ndarray} from a .safetensors or torch zip checkpoint (see module docstring)."""
  path = str(path)
  sd = _load_safetensors(path) if path.endswith(".safetensors") else _load_pt(path)
  if key is not None:
    if not isinstance(sd, dict) or key not in sd:
      raise KeyError(f"{path}: no entry {key!r} at the top level (keys: {list(sd)[:10]})")
    sd = sd[key]
  if not isinstance(sd, dict) or not all(isinstance(v, np.ndarray) for v in sd.values()):
    top = list(sd)[:10] if isinstance(sd, dict) else type(sd).__name__
    raise ValueError(f"{path}: not a flat state dict of tensors (top level: {top}); pass key= "
                     "for a nested one, e.g. key='model' for LlamaGen checkpoints")
  return dict(sd)
