"""Files read and written safely.

Reading a user's file: it must be a regular file (a link to one is fine; a FIFO, a device, a socket or a directory is
refused before it is opened for reading, so nothing blocks or reads forever), no larger than what it should hold
(JSON, text and .npz members are capped before they are read or allocated), and JSON no deeper than ``JSON_DEPTH``.
Each refusal is a ``FileRefused`` (a ValueError: exit 2) naming the file and the problem in one line.

Writing (run directories, outputs): a new file is created with O_CREAT | O_EXCL | O_NOFOLLOW and mode 0666 masked by
the umask (never chmod-ed through a path), written, fsync-ed and renamed over the target (``atomic_write``); a
symbolic link where a file would be written or appended to is refused, never followed. SHA-256 of files, safetensors
with a format tag.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import stat
import tempfile
import zipfile
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import CheckpointError, FileRefused

MiB = 1 << 20
JSON_BYTES = 16 * MiB  # a config, checkpoint record or metadata file; larger ones say what they hold
JSON_DEPTH = 32  # nesting of any JSON emd_fast reads (configs nest 4 deep)
NPZ_BYTES = 1 << 30  # the arrays of an .npz (mixtures, FID statistics), decompressed


def describe(path: str | os.PathLike) -> str:
    """What ``path`` is, for a one-line refusal: 'a FIFO', 'a directory', 'a symbolic link to a character device',
    'a dangling symbolic link', 'no such file', ..."""
    try:
        st = os.lstat(path)
    except OSError:
        return "no such file"
    link = stat.S_ISLNK(st.st_mode)
    if link:
        try:
            st = os.stat(path)
        except OSError:
            return "a dangling symbolic link"
    kind = next(name for test, name in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"),
                                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
                                       (lambda m: True, "not a regular file")) if test(st.st_mode))
    return f"a symbolic link to {kind}" if link else kind


def check_regular(path: str | os.PathLike, what: str) -> os.stat_result:
    """stat of ``path`` (through links) if it is a regular file, else FileRefused: '<what> <path>: a FIFO, not a
    regular file'."""
    try:
        st = os.stat(path)
    except OSError as e:
        kind = describe(path)
        reason = kind if kind in ("no such file", "a dangling symbolic link") else f"cannot read it ({e.strerror})"
        raise FileRefused(f"{what} {path}: {reason}") from None
    if not stat.S_ISREG(st.st_mode):
        raise FileRefused(f"{what} {path}: {describe(path)}, not a regular file")
    return st


def check_size(path: str | os.PathLike, what: str, limit: int) -> None:
    """FileRefused unless ``path`` is a regular file of at most ``limit`` bytes (from its stat: nothing is read)."""
    size = check_regular(path, what).st_size
    if size > limit:
        raise FileRefused(f"{what} {path}: {size / MiB:.1f} MiB, more than the {limit / MiB:g} MiB such a file may "
                          f"hold")


def open_regular(path: str | os.PathLike, what: str) -> BinaryIO:
    """``path`` opened for reading if it is a regular file (checked on the opened file: O_NONBLOCK keeps a FIFO from
    blocking the open). FileRefused otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        kind = describe(path)
        reason = kind if kind in ("no such file", "a dangling symbolic link") else f"cannot read it ({e.strerror})"
        raise FileRefused(f"{what} {path}: {reason}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise FileRefused(f"{what} {path}: {describe(path)}, not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_bytes(path: str | os.PathLike, what: str, limit: int) -> bytes:
    """The content of a regular file of at most ``limit`` bytes (FileRefused beyond, before reading it)."""
    with open_regular(path, what) as f:
        size = os.fstat(f.fileno()).st_size
        data = f.read(limit + 1) if size <= limit else b""
    if size > limit or len(data) > limit:
        raise FileRefused(f"{what} {path}: {max(size, len(data)) / MiB:.1f} MiB, more than the {limit / MiB:g} MiB "
                          f"such a file may hold")
    return data


def read_text(path: str | os.PathLike, what: str, limit: int) -> str:
    """A UTF-8 text file of at most ``limit`` bytes (see read_bytes)."""
    try:
        return read_bytes(path, what, limit).decode("utf-8")
    except UnicodeDecodeError as e:
        raise FileRefused(f"{what} {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def parse_json(text: str | bytes, what: str, source: str | os.PathLike = ""):
    """A JSON document nested at most JSON_DEPTH deep; FileRefused otherwise, in one line: '<source>: unreadable
    <what> (<why>)'."""
    where = f"{source}: " if str(source) else ""
    try:
        value = json.loads(text)
    except RecursionError:
        raise FileRefused(f"{where}unreadable {what} (JSON nested too deeply)") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise FileRefused(f"{where}unreadable {what} ({str(e).splitlines()[0] if str(e) else type(e).__name__})") \
            from None
    level, todo = 0, [value]
    while todo:
        level += 1
        if level > JSON_DEPTH:
            raise FileRefused(f"{where}unreadable {what} (JSON nested more than {JSON_DEPTH} deep)")
        todo = [v for node in todo for v in (node.values() if isinstance(node, dict) else node)
                if isinstance(v, (dict, list))]
    return value


def read_json(path: str | os.PathLike, what: str, limit: int = JSON_BYTES):
    """A JSON file (regular, at most ``limit`` bytes, JSON_DEPTH deep); FileRefused naming it otherwise."""
    return parse_json(read_bytes(path, what, limit), what, path)


def read_npz(path: str | os.PathLike, what: str, limit: int = NPZ_BYTES) -> dict[str, np.ndarray]:
    """The arrays of an .npz (no pickles), each checked before it is read: a numeric array whose header's shape fits
    the bytes its member holds, all together at most ``limit`` bytes decompressed. FileRefused otherwise."""
    with open_regular(path, what) as f:
        try:
            with zipfile.ZipFile(f) as zf:
                total = 0
                for info in zf.infolist():
                    total += info.file_size
                    if total > limit:
                        raise FileRefused(f"{what} {path}: its arrays hold more than {limit / MiB:g} MiB")
                    with zf.open(info) as member:
                        version = np.lib.format.read_magic(member)
                        header = {(1, 0): np.lib.format.read_array_header_1_0,
                                  (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                        if header is None:
                            raise FileRefused(f"{what} {path}: {info.filename}: .npy format {version} not supported")
                        shape, _, dtype = header(member)
                        if dtype.hasobject or dtype.kind not in "biuf":
                            raise FileRefused(f"{what} {path}: {info.filename}: {dtype} is not a numeric array")
                        if math.prod(shape) * dtype.itemsize > info.file_size:
                            raise FileRefused(f"{what} {path}: {info.filename} claims shape {shape}, more than its "
                                              f"{info.file_size} bytes hold")
                f.seek(0)
                with np.load(f, allow_pickle=False) as npz:
                    return {k: npz[k] for k in npz.files}
        except FileRefused:
            raise
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, NotImplementedError) as e:
            raise FileRefused(f"{what} {path}: not a readable .npz ({str(e).splitlines()[0] if str(e) else e!r})") \
                from None


_digests: dict[tuple, str] = {}  # sha256_file(reuse=True)'s results by file identity and version


def file_version(st: os.stat_result) -> tuple:
    """A file's identity and version (device, inode, size, modification and change times): equal for the same file
    unchanged, whatever path names it; the key of what a process reads from a file only once."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def sha256_file(path: str | os.PathLike, what: str = "file", reuse: bool = False) -> str:
    """The file's SHA-256 (hex). reuse: a file hashed with reuse before in this process and unchanged since (same
    device, inode, size, modification and change times) is not read again; for the inputs a run's set-up names in
    several places (a teacher's multi-GB file), never for a check of a file just written (file times are coarse)."""
    with open_regular(path, what) as f:
        key = file_version(os.fstat(f.fileno()))
        if not reuse or key not in _digests:
            h = hashlib.sha256()
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
            _digests[key] = h.hexdigest()
    return _digests[key]


# --- writing -----------------------------------------------------------------------------------------------------

def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def refuse_link(path: str | os.PathLike) -> None:
    """FileRefused if ``path`` is a symbolic link: emd_fast never writes through one."""
    if os.path.islink(path):
        raise FileRefused(f"{path} is a symbolic link ({describe(path)}): emd_fast does not write through links; "
                          f"remove it")


def refuse_same_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """FileRefused if writing ``dst`` would replace ``src`` (the same file, also through links or another path)."""
    try:
        same = os.path.samefile(src, dst)
    except OSError:  # one of them does not exist
        same = False
    if same or Path(os.path.realpath(src)) == Path(os.path.realpath(dst)):
        raise FileRefused(f"{dst} is the source file {src}: the output would replace its own input; choose another "
                          f"output path")


def _cannot_write(path, e: OSError) -> OSError:
    return OSError(f"cannot write {path}: {e.strerror or e}")


def _create(path: Path) -> int:
    """A new file at ``path`` (O_EXCL: never an existing one; O_NOFOLLOW: never through a link), mode 0666 & ~umask.
    A leftover regular file there (a killed writer's) is removed first; a link there is refused."""
    refuse_link(path)
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISREG(os.lstat(path).st_mode):
            raise FileRefused(f"{path}: {describe(path)} where emd_fast writes a temporary file; remove it")
        os.unlink(path)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file object whose content replaces ``path`` when the block ends without an error: written to
    ``<path>.tmp`` (created new, see _create), fsync-ed and renamed; on an error the temporary file is removed and
    ``path`` is as it was. A failed write is an OSError naming ``path``; a link at ``path`` is refused."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        refuse_link(path)
        fd = _create(tmp)
    except OSError as e:
        raise _cannot_write(path, e) from None
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        refuse_link(path)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise _cannot_write(path, e) from None
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` by ``text`` (UTF-8) atomically (``atomic_write``)."""
    with atomic_write(path) as f:
        f.write(text.encode())


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1))


def open_append(path: str | os.PathLike):
    """A text file opened for appending (created with the umask's mode if missing); a link or a file that is not
    regular is refused."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
    except OSError as e:
        if os.path.islink(path):
            refuse_link(path)
        raise _cannot_write(path, e) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise FileRefused(f"{path}: {describe(path)}, not a regular file; remove it")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "a")


def make_dirs(path: str | os.PathLike) -> bool:
    """Create ``path`` and its missing parents, at any depth (no recursion); True if ``path`` itself was created
    here. An existing ``path`` must be a directory (a link to one is the user's choice)."""
    path = Path(path)
    missing = []
    while not os.path.isdir(path):
        if os.path.lexists(path):
            raise FileExistsError(f"{path} exists and is not a directory ({describe(path)})")
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    created = False
    for directory in reversed(missing):
        try:
            os.mkdir(directory)
            created = True
        except FileExistsError:
            created = False
            if not os.path.isdir(directory):
                raise
    return created and bool(missing)


def run_subdir(directory: str | os.PathLike) -> Path:
    """A folder inside a run directory (checkpoints/, samples/), created if missing; FileRefused if it is a link or
    not a directory (its files would land elsewhere)."""
    directory = Path(directory)
    with contextlib.suppress(FileExistsError):
        os.mkdir(directory)
    if os.path.islink(directory) or not os.path.isdir(directory):
        raise FileRefused(f"{directory}: {describe(directory)}, not a folder of this run; remove it")
    return directory


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None):
    """Write tensors (detached, contiguous, on the CPU) to ``path`` atomically: into a new private folder beside it
    (safetensors writes by name, and nobody else can place a link there), fsync-ed, given the umask's mode through
    its descriptor, renamed over ``path``. A failed write (a full disk) is an OSError naming the file, and leaves
    ``path`` as it was."""
    path = Path(path)
    try:
        refuse_link(path)
        private = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as e:
        raise _cannot_write(path, e) from None
    try:
        tmp = private / path.name
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fchmod(fd, 0o666 & ~_umask())  # some safetensors versions create 0600 files
            os.fsync(fd)
        finally:
            os.close(fd)
        refuse_link(path)
        os.replace(tmp, path)
    except SafetensorError as e:
        raise OSError(f"cannot write {path}: {e}") from None
    except OSError as e:
        raise _cannot_write(path, e) from None
    finally:
        shutil.rmtree(private, ignore_errors=True)


def read_safetensors(path: Path, file_format: str, what: str, kind: str,
                     with_tensors: bool = True) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a safetensors file whose metadata says ``format == file_format`` (``with_tensors``
    False: the header only, and no tensors); CheckpointError (one line) for an unreadable file ("cannot read <what>
    file") or a foreign format ("is not <kind> file")."""
    try:
        check_regular(path, f"{what} file")
        with safe_open(str(path), framework="pt") as f:
            meta, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()} if with_tensors else {}
    except FileRefused as e:
        raise CheckpointError(str(e)) from None
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"cannot read {what} file {path}: {e}") from None
    if meta.get("format") != file_format:
        raise CheckpointError(f"{path} is not {kind} file (format={meta.get('format')!r})")
    return meta, tensors
