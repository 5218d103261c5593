"""Pickled files read as data: nothing in them runs, and the work and memory they cost are bounded by their size.

Python's pickle is a small program; torch files (``torch.save``'s zip and legacy formats, TorchScript archives, the
storages inside NVlabs pickles) are pickles plus raw tensor bytes. Here:

* ``scan`` walks a pickle's opcodes before it is run: memo indices may only grow one by one (the C unpickler sizes its
  memo table by the largest index: 9 bytes could ask for gigabytes), extension-registry opcodes are refused.
* ``DataUnpickler`` resolves only the globals a reader allows ((module, name) -> object; anything else is a
  CheckpointError naming it) and hands persistent ids (torch's storages) to the reader.
* ``Tensors`` builds every tensor from a storage that lies in the file: a storage's bytes are read only when the file
  holds them (a zip record stored, not compressed, of exactly the declared size; a legacy record whose length header
  matches), each tensor is a non-overlapping view inside its storage (a stride-0 or overlapping view, which could
  materialise far more than the file holds, is refused), and all tensors together hold at most SHARED_VIEWS times
  the bytes of the storages read. Nothing is allocated from a size the file merely claims.

Every refusal is a ``CheckpointError`` (one line). Readers: ``load_torch_file`` (zip or legacy torch files, TorchScript
archives: tensors and objects as data), ``emd_fast.teachers.edm_pickle`` (NVlabs pickles).
"""
from __future__ import annotations

import collections
import io
import math
import mmap
import os
import pickle
import pickletools
import struct
import zipfile
from pathlib import Path

import torch

from .errors import CheckpointError, FileRefused
from .files import open_regular

STORAGE_DTYPES = {f"{name}Storage": dtype for name, dtype in (
    ("Float", torch.float32), ("Double", torch.float64), ("Half", torch.float16), ("BFloat16", torch.bfloat16),
    ("Long", torch.int64), ("Int", torch.int32), ("Short", torch.int16), ("Char", torch.int8), ("Byte", torch.uint8),
    ("Bool", torch.bool))}
MAX_DIMS = 16
SHARED_VIEWS = 4  # all tensors together hold at most this many times the storage bytes (tied weights share one)
MEMO_WRITES = {"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"}
REFUSED_OPCODES = {"EXT1", "EXT2", "EXT4"}  # copyreg's extension registry: globals by number
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001


class Malformed(CheckpointError):
    """Not a readable pickle (truncated, garbage): the reader says what the file should have been."""


def scan(stream) -> None:
    """Walk one pickle (from the stream's position to its STOP) without running it; CheckpointError for a memo index
    beyond the number of memo writes so far, an extension-registry opcode, or a malformed pickle."""
    writes = 0
    try:
        for opcode, arg, pos in pickletools.genops(stream):
            if opcode.name in MEMO_WRITES:
                if opcode.name != "MEMOIZE" and arg > writes:
                    raise CheckpointError(f"memo index {arg} at byte {pos} after {writes} memo entries (a pickle "
                                          f"writes them in order; a large index only allocates memory)")
                writes += 1
            elif opcode.name in REFUSED_OPCODES:
                raise CheckpointError(f"opcode {opcode.name} at byte {pos} (copyreg extensions) is refused")
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - genops raises ValueError, EOFError, OverflowError, ... on a bad pickle
        raise Malformed(f"{type(e).__name__}: {_first_line(e)}") from None


class DataUnpickler(pickle.Unpickler):
    """An unpickler that resolves only ``allowed`` globals ((module, name) -> the object to use), or those
    ``classes(module, name)`` makes (None: refused), and passes persistent ids to ``persistent`` (None: refused).
    ``load`` scans the pickle first (``scan``)."""

    def __init__(self, stream, allowed: dict, persistent=None, what: str = "this file", classes=None):
        super().__init__(stream)
        self.stream, self.allowed, self.persistent, self.what, self.classes = stream, allowed, persistent, what, classes

    def find_class(self, module, name):
        found = self.allowed.get((module, name))
        if found is None and self.classes is not None:
            found = self.classes(module, name)
        if found is None:
            raise CheckpointError(f"refuses global {module}.{name} (not part of {self.what})")
        return found

    def persistent_load(self, pid):
        if self.persistent is None:
            raise CheckpointError("holds a persistent reference, which this format never has")
        return self.persistent(pid)

    def load(self):
        start = self.stream.tell()
        scan(self.stream)
        self.stream.seek(start)
        return super().load()


class Storage:
    """A storage read from a file: its elements as a flat tensor."""

    def __init__(self, flat: torch.Tensor):
        self.flat = flat


class Tensors:
    """Tensors built from the storages of one file (see the module docstring); ``rebuild`` stands in for torch's
    ``_rebuild_tensor_v2`` and ``parameter`` for ``_rebuild_parameter``."""

    def __init__(self):
        self.storage_bytes = self.tensor_bytes = 0

    def storage(self, data, dtype: torch.dtype, numel: int) -> Storage:
        """A Storage of ``numel`` elements of ``dtype`` from ``data`` (bytes-like holding exactly them, copied)."""
        size = numel * _itemsize(dtype)
        if len(data) != size:
            raise CheckpointError(f"a storage of {numel} {dtype} elements needs {size} bytes, the file holds "
                                  f"{len(data)}")
        self.storage_bytes += size
        flat = torch.frombuffer(bytearray(data), dtype=dtype) if size else torch.empty(0, dtype=dtype)
        return Storage(flat)

    def rebuild(self, storage, offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
        if not isinstance(storage, Storage):
            raise CheckpointError(f"a tensor on a {type(storage).__name__}, not on a storage of the file")
        if backward_hooks:
            raise CheckpointError("a tensor with backward hooks")
        return self.view(storage.flat, offset, size, stride)

    def view(self, flat: torch.Tensor, offset, size, stride) -> torch.Tensor:
        """flat.as_strided(size, stride, offset) once it is known to be a non-overlapping view inside ``flat`` and
        within the file's bytes; CheckpointError otherwise."""
        if not (_ints(size) and _ints(stride) and isinstance(offset, int) and not isinstance(offset, bool)
                and len(size) == len(stride) <= MAX_DIMS and offset >= 0):
            raise CheckpointError(f"a tensor with malformed size {size!r}, stride {stride!r} or offset {offset!r}")
        numel, extent = math.prod(size), 1
        for st, sz in sorted((st, sz) for sz, st in zip(size, stride) if sz > 1):
            if st < extent:  # this dimension's steps land on elements the previous ones reach
                raise CheckpointError(f"a tensor of size {tuple(size)} with stride {tuple(stride)}: its elements "
                                      f"overlap (a view larger than the data the file holds)")
            extent += st * (sz - 1)
        if numel and offset + extent > flat.numel():
            raise CheckpointError(f"a tensor of size {tuple(size)} at offset {offset} reaches past its storage of "
                                  f"{flat.numel()} elements")
        self.tensor_bytes += numel * flat.element_size()
        if self.tensor_bytes > SHARED_VIEWS * self.storage_bytes + (1 << 20):
            raise CheckpointError(f"its tensors hold {self.tensor_bytes} bytes, more than {SHARED_VIEWS} x the "
                                  f"{self.storage_bytes} bytes of storage in the file (views of views)")
        return flat.as_strided(tuple(size), tuple(stride), offset)

    def parameter(self, data, requires_grad=False, backward_hooks=None, state=None):
        if not isinstance(data, torch.Tensor) or backward_hooks or state:
            raise CheckpointError("a parameter that is not a plain tensor")
        return torch.nn.Parameter(data, requires_grad=False)

    def globals(self) -> dict:
        """The globals a pickle of tensors uses: the rebuilds, OrderedDict, the storage classes (their dtypes)."""
        return {("torch._utils", "_rebuild_tensor_v2"): self.rebuild,
                ("torch._utils", "_rebuild_parameter"): self.parameter,
                ("collections", "OrderedDict"): collections.OrderedDict,
                **{("torch", name): dtype for name, dtype in STORAGE_DTYPES.items()}}


def check_nesting(obj, limit: int = 64) -> None:
    """CheckpointError if the objects below ``obj`` (containers, and the ``state`` of objects read as data) nest
    deeper than ``limit``: nothing that walks, prints or compares them afterwards can then recurse too deeply. Each
    object is visited once (a cycle or shared subtree costs nothing)."""
    seen, level = {id(obj)}, [obj]
    for _ in range(limit):
        below = [child for node in level for child in _children(node) if id(child) not in seen
                 and (isinstance(child, CONTAINERS) or isinstance(getattr(child, "state", None), dict))]
        if not below:
            return
        seen.update(id(child) for child in below)
        level = list({id(child): child for child in below}.values())
    raise CheckpointError(f"objects nested more than {limit} deep")


CONTAINERS = (dict, list, tuple, set, frozenset)


def _children(node):
    if isinstance(node, dict):
        return [*node.keys(), *node.values()]
    if isinstance(node, CONTAINERS):
        return node
    state = getattr(node, "state", None)
    return [*state.keys(), *state.values()] if isinstance(state, dict) else ()


def storage_id(pid) -> tuple[str, torch.dtype, int]:
    """(key, dtype, numel) of torch's persistent id ('storage', <dtype>, key, location, numel[, view metadata])."""
    if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage" and isinstance(pid[1], torch.dtype)
            and isinstance(pid[2], str) and isinstance(pid[4], int) and pid[4] >= 0
            and (len(pid) == 5 or pid[5] is None)):
        raise CheckpointError(f"a persistent id that is not a plain storage: {str(pid)[:80]}")
    return pid[2], pid[1], pid[4]


def legacy_storages(stream, tensors: Tensors, allowed: dict, what: str, classes=None):
    """The object of a torch file in the legacy (pre-zip) format from ``stream``: magic number, protocol, system
    info, the object (storages as persistent ids), the storage keys, then each storage's length and bytes."""
    start = stream.tell()
    if stream.read(2) != b"\x80\x02":  # torch writes the legacy format with pickle protocol 2
        raise CheckpointError("not a torch legacy record (no legacy magic number)")
    stream.seek(start)
    header = DataUnpickler(stream, {}, what=what)
    if header.load() != LEGACY_MAGIC or DataUnpickler(stream, {}, what=what).load() != LEGACY_PROTOCOL:
        raise CheckpointError("not a torch file (no legacy magic number)")
    info = DataUnpickler(stream, {}, what=what).load()
    if not (isinstance(info, dict) and info.get("little_endian") is True):
        raise CheckpointError("a torch file of a big-endian machine, or without its system information")
    pending: dict[str, tuple[torch.dtype, int]] = {}

    def persistent(pid):
        key, dtype, numel = storage_id(pid)
        pending.setdefault(key, (dtype, numel))
        return _Pending(key)

    deferred = {name: _defer(fn) for name, fn in tensors.globals().items() if name[0] == "torch._utils"}
    obj = DataUnpickler(stream, allowed | tensors.globals() | deferred, persistent, what, classes).load()
    keys = DataUnpickler(stream, {}, what=what).load()
    if not (isinstance(keys, list) and set(keys) == set(pending)):
        raise CheckpointError("its storage keys do not match the storages it uses")
    read = {}
    for key in keys:
        dtype, numel = pending[key]
        length = stream.read(8)
        if len(length) != 8 or struct.unpack("<q", length)[0] != numel:
            raise CheckpointError(f"storage {key}: its length header does not say the {numel} elements it declares")
        read[key] = tensors.storage(stream.read(numel * _itemsize(dtype)), dtype, numel)
    return _resolve(obj, read, {})


class _Pending:
    """A legacy file's storage, referenced before its bytes (which follow the pickle) are read."""

    def __init__(self, key: str):
        self.key = key


class _Call:
    """A rebuild in a legacy file, made once the storages' bytes are read."""

    def __init__(self, fn, args):
        self.fn, self.args = fn, args


def _defer(fn):
    return lambda *args: _Call(fn, args)


def _resolve(obj, storages: dict[str, Storage], done: dict):
    """``obj`` with its pending storages and rebuilds made (containers rebuilt, each object once)."""
    if id(obj) in done:
        return done[id(obj)]
    if isinstance(obj, _Pending):
        out = storages[obj.key]
    elif isinstance(obj, _Call):
        out = obj.fn(*(_resolve(a, storages, done) for a in obj.args))
    elif isinstance(obj, dict):
        out = done[id(obj)] = type(obj)()
        out.update((k, _resolve(v, storages, done)) for k, v in obj.items())
    elif isinstance(obj, (list, tuple)):
        out = type(obj)(_resolve(v, storages, done) for v in obj)
    else:
        out = obj
    done[id(obj)] = out
    return out


def load_torch_file(path: str | Path, what: str, allowed: dict | None = None, classes=None):
    """The object a torch file holds, read as data: ``torch.save``'s zip format (and TorchScript archives, which
    share it) or the legacy format; tensors as non-overlapping views of the storages the file holds (see
    ``Tensors``), only ``allowed`` globals (or those ``classes`` makes, see DataUnpickler) besides tensors.
    CheckpointError (one line, naming the file) otherwise."""
    try:
        with open_regular(path, what) as f:
            head = f.read(4)
            if head == b"PK\x03\x04":
                f.seek(0)
                obj = _load_zip(f, Tensors(), allowed or {}, what, classes)
            elif head and not head.startswith(b"\x80\x02"):  # torch's legacy format: pickle protocol 2
                raise Malformed("neither torch.save's zip format nor its legacy format")
            else:
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                    obj = legacy_storages(data, Tensors(), allowed or {}, what, classes)
        check_nesting(obj)
        return obj
    except FileRefused:
        raise
    except Malformed as e:
        raise CheckpointError(f"{what} {path} is not a readable torch file ({e})") from None
    except CheckpointError as e:
        raise CheckpointError(f"{what} {path}: {e}") from None
    except RecursionError:
        raise CheckpointError(f"{what} {path}: objects nested too deeply") from None
    except (OSError, ValueError) as e:
        if os.path.getsize(path) == 0:
            raise CheckpointError(f"{what} {path}: an empty file") from None
        raise CheckpointError(f"{what} {path} is not a readable torch file ({type(e).__name__}: "
                              f"{_first_line(e)})") from None
    except Exception as e:  # noqa: BLE001 - whatever a corrupt pickle makes the unpickler or a rebuild raise
        raise CheckpointError(f"{what} {path} is not a readable torch file ({type(e).__name__}: "
                              f"{_first_line(e)})") from None


def _load_zip(file, tensors: Tensors, allowed: dict, what: str, classes=None):
    """The zip format: <prefix>/data.pkl (the object; storages as persistent ids) and <prefix>/data/<key> (each
    storage's bytes, stored uncompressed)."""
    with zipfile.ZipFile(file) as zf:
        names = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(names) != 1:
            raise CheckpointError("a zip file without one <archive>/data.pkl: not a torch file")
        prefix = names[0][:-len("data.pkl")]
        pickled = zf.getinfo(names[0])
        if pickled.file_size > 256 << 20:
            raise CheckpointError(f"its data.pkl declares {pickled.file_size} bytes")

        def persistent(pid):
            key, dtype, numel = storage_id(pid)
            info = _member(zf, f"{prefix}data/{key}")
            if info.compress_type != zipfile.ZIP_STORED or info.file_size != numel * _itemsize(dtype):
                raise CheckpointError(f"storage {key}: a record of {info.file_size} bytes "
                                      f"({'stored' if info.compress_type == zipfile.ZIP_STORED else 'compressed'}) "
                                      f"for {numel} {dtype} elements")
            return tensors.storage(zf.read(info), dtype, numel)

        return DataUnpickler(io.BytesIO(zf.read(pickled)), allowed | tensors.globals(), persistent, what,
                             classes).load()


def _member(zf: zipfile.ZipFile, name: str) -> zipfile.ZipInfo:
    try:
        return zf.getinfo(name)
    except KeyError:
        raise CheckpointError(f"no record {name} for a storage it uses") from None


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def _ints(values) -> bool:
    return isinstance(values, (tuple, list, torch.Size)) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__
