"""Safe outputs: romscale never destroys what it did not write, and never half-writes.

Every folder romscale writes carries `romscale_manifest.json`: its kind, the exact list of files in
it (bytes and sha256) and kind-specific metadata. That file is what makes a folder "a complete
romscale output": it is written last, inside the temporary folder, before the folder is swapped in.

The rules, for folders (`output_dir`) and JSON files (`write_json_output`) alike:
- a target that equals, contains or lies inside an input is refused, whatever the flags;
- an existing target is replaced only when it is a complete romscale output of the same kind and
  `overwrite` is given (an empty folder holds nothing to lose and is taken as is);
- symbolic links are never replaced, nor a folder that holds the current working directory;
- the replace is crash-safe: the new folder is written beside the target, fsynced, then exchanged
  with the old one in a single `renameat2(RENAME_EXCHANGE)` (Linux), so at every instant the
  target is the old complete output or the new one. Where the exchange is unavailable, the old
  folder is renamed aside and the new one in; a writer that finds the target missing with a
  complete new or old folder beside it finishes or undoes that swap before anything else;
- concurrent writers to one target: a non-blocking `flock` on a lock file beside the target lets
  one win; the others fail with a clear error before they write anything.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Iterator

from romscale.errors import RomscaleError

MANIFEST = "romscale_manifest.json"
FORMAT = "romscale"
VERSION = 2
JSON_MARKER = "romscale_output"  # top-level key of every JSON file romscale writes
MAX_JSON_BYTES = 64 << 20  # manifests, configs and reports are small; refuse anything absurd
_TMP, _NEW, _OLD, _LOCK = "romscale-tmp", "romscale-new", "romscale-old", "romscale-lock"


class OutputError(RomscaleError):
    """An output target that romscale refuses to write (it would destroy something)."""


# -- paths ------------------------------------------------------------------------------------------
def _relation(a: Path, b: Path) -> str | None:
    if a == b:
        return "is"
    if a.is_relative_to(b):
        return "lies inside"
    if b.is_relative_to(a):
        return "contains"
    return None


def check_target(
    target: str | os.PathLike, *, kind: str, inputs: Iterable[str | os.PathLike] = (), overwrite: bool = False,
    what: str = "output", is_file: bool = False,
) -> Path:
    """Raise OutputError unless `target` may be written; returns its absolute path. No side effects.

    Called again inside the writers; CLIs call it first so a refused target fails before any work."""
    raw = Path(target)
    if str(raw) == "" or raw.name in ("", ".", ".."):
        raw = raw.resolve()
    if raw.is_symlink():
        raise OutputError(f"{what} {target}: is a symbolic link; romscale does not replace links (give the real path)")
    absolute = Path(os.path.abspath(raw))
    resolved = absolute.parent.resolve() / absolute.name
    if resolved.parent == resolved:
        raise OutputError(f"{what} {target}: the file-system root cannot be an output")
    for src in inputs:
        s = Path(src).resolve()
        rel = _relation(resolved, s)
        if rel is not None:
            raise OutputError(f"{what} {target}: {rel} the input {src}; romscale never writes over or into its inputs")
    if not is_file and _relation(Path.cwd().resolve(), resolved) in ("is", "lies inside"):
        raise OutputError(f"{what} {target}: holds the current folder; choose a new folder to write into")
    if not os.path.lexists(resolved):
        return resolved
    if is_file:
        if not resolved.is_file():
            raise OutputError(f"{what} {target}: exists and is not a file; expected a path for a JSON file")
        if not _is_romscale_file(resolved, kind):
            raise OutputError(f"{what} {target}: exists and was not written by romscale (as its {kind} file); refusing to overwrite it")
    else:
        if not resolved.is_dir():
            raise OutputError(f"{what} {target}: exists and is not a folder; expected a new folder or a romscale {kind} output")
        if not any(resolved.iterdir()):
            return resolved  # an empty folder holds nothing to lose
        found = output_kind(resolved)
        if found is None:
            raise OutputError(
                f"{what} {target}: exists and is not a romscale output (no complete {MANIFEST}); "
                "romscale only replaces folders it wrote; choose a new folder"
            )
        if found != kind:
            raise OutputError(f"{what} {target}: is a romscale {found} output, not a {kind}; refusing to replace it")
    if not overwrite:
        raise OutputError(f"{what} {target}: already exists; pass --overwrite (API: overwrite=True) to replace it")
    return resolved


def output_kind(folder: Path) -> str | None:
    """The kind of a complete romscale output folder, or None."""
    file = folder / MANIFEST
    if file.is_symlink() or not file.is_file():
        return None
    try:
        m = read_json(file, OutputError)
    except OutputError:
        return None
    if isinstance(m, dict) and m.get("format") == FORMAT and isinstance(m.get("kind"), str):
        return m["kind"]
    return None


PNG_MARKER = b"tEXtSoftware\x00romscale"  # the text chunk save_png writes (PNG spec: keyword\0text)


def _is_romscale_png(file: Path) -> bool:
    with open(file, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n" and PNG_MARKER in f.read(4096)


TEXT_MARKER = "<!-- romscale_output: {kind} -->"  # first line of every text (markdown) file romscale writes


def _is_romscale_text(file: Path, kind: str) -> bool:
    with open(file, "rb") as f:
        return f.readline(256).rstrip(b"\r\n") == TEXT_MARKER.format(kind=kind).encode()


def _is_romscale_file(file: Path, kind: str) -> bool:
    """A file romscale wrote as `kind`: a PNG with its text chunk, a text file with its marker line,
    or JSON with its marker key."""
    if kind == "png":
        return _is_romscale_png(file)
    if _is_romscale_text(file, kind):
        return True
    try:
        obj = read_json(file, OutputError)
    except OutputError:
        return False
    return isinstance(obj, dict) and obj.get(JSON_MARKER) == kind


# -- locking and swapping ---------------------------------------------------------------------------
@contextlib.contextmanager
def _locked(target: Path, what: str) -> Iterator[None]:
    """Hold an exclusive, non-blocking lock on `target`'s lock file for the duration."""
    lock = target.parent / f".{target.name}.{_LOCK}"
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputError(f"{what} {target}: cannot write in {target.parent} ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise OutputError(f"{what} {target}: another romscale process is writing it now; try again when it has finished") from None
        try:  # the previous holder may have unlinked the file between our open and our lock
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    else:
        raise OutputError(f"{what} {target}: its lock file {lock} keeps changing; is another writer running?")
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        os.close(fd)


def _make_parent(target: Path, what: str) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{what} {target}: cannot create its folder {target.parent} ({exc.strerror})") from None


def _leftovers(target: Path, tag: str) -> list[Path]:
    prefix = f".{target.name}.{tag}-"
    return sorted(p for p in target.parent.iterdir() if p.name.startswith(prefix))


def _recover(target: Path) -> None:
    """Finish or undo a swap that a killed writer left half done, then drop its debris."""
    if not os.path.lexists(target):
        done = [p for p in _leftovers(target, _NEW) if (p / MANIFEST).is_file() or p.is_file()]
        old = _leftovers(target, _OLD)
        if done:
            os.replace(done[-1], target)  # the new output was complete: finish the swap
        elif old:
            os.replace(old[-1], target)  # undo: the old output comes back
    for tag in (_TMP, _NEW, _OLD):
        for p in _leftovers(target, tag):
            _remove(p)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2). False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _swap_in(tmp: Path, target: Path) -> None:
    """Put the complete folder or file `tmp` at `target`, keeping the old one until then."""
    if tmp.is_file() or not os.path.lexists(target):
        os.replace(tmp, target)  # atomic for a file, and for a folder onto nothing
    elif not _exchange(tmp, target):  # after an exchange, tmp holds the old output
        new = tmp.with_name(tmp.name.replace(_TMP, _NEW))
        old = tmp.with_name(tmp.name.replace(_TMP, _OLD))
        os.rename(tmp, new)  # marks the new folder complete for _recover
        os.rename(target, old)
        os.rename(new, target)
        tmp = old
    _fsync_dir(target.parent)
    if os.path.lexists(tmp):
        _remove(tmp)


# -- writers ----------------------------------------------------------------------------------------
def sha256_file(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class Output:
    """The folder being written (`path`, a temporary sibling of `target`) and its manifest metadata."""

    path: Path
    target: Path
    kind: str
    meta: dict[str, Any] = field(default_factory=dict)


def _list_files(folder: Path) -> list[str]:
    names = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for f in sorted(files):
            names.append(Path(root, f).relative_to(folder).as_posix())
    return names


def _finish(out: Output) -> None:
    files = {}
    mode = 0o666 & ~_umask()  # some writers (safetensors) create 0600 files; outputs read like any file
    for name in _list_files(out.path):
        if name == MANIFEST:
            continue
        p = out.path / name
        if p.is_symlink():
            raise OutputError(f"internal: {name} in {out.target} is a symbolic link; outputs hold plain files only")
        os.chmod(p, mode)
        with open(p, "rb") as f:
            os.fsync(f.fileno())
        files[name] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    manifest = {"format": FORMAT, "kind": out.kind, "version": VERSION, **out.meta, "files": files}
    _write_synced(out.path / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    for d in {(out.path / n).parent for n in files} | {out.path}:
        _fsync_dir(d)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def output_dir(
    target: str | os.PathLike, *, kind: str, inputs: Iterable[str | os.PathLike] = (), overwrite: bool = False,
    what: str = "output", meta: dict[str, Any] | None = None,
) -> Iterator[Output]:
    """Write a romscale output folder crash-safely. Yields an Output whose `path` the caller fills.

    On success the manifest (kind, every file's bytes and sha256, `meta`) is written and the folder
    swapped in; on error the temporary folder is removed and the target is untouched."""
    inputs = list(inputs)
    final = check_target(target, kind=kind, inputs=inputs, overwrite=overwrite, what=what)
    _make_parent(final, what)
    with _locked(final, what):
        _recover(final)
        final = check_target(target, kind=kind, inputs=inputs, overwrite=overwrite, what=what)  # now under the lock
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{_TMP}-", dir=final.parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700
        out = Output(path=tmp, target=final, kind=kind, meta=dict(meta or {}))
        try:
            yield out
            _finish(out)
            _swap_in(tmp, final)
        except BaseException:
            _remove(tmp)
            raise


def wait_for_output(target: str | os.PathLike, kind: str, *, what: str = "output", timeout_s: float = 600.0,
                    poll_s: float = 1.0) -> Path:
    """Wait until `target` is a finished romscale output of `kind` (another process makes it: the
    first of several shards); an error after `timeout_s`."""
    final = Path(target)
    deadline = time.monotonic() + timeout_s
    while output_kind(final) != kind:
        if time.monotonic() > deadline:
            raise OutputError(f"{what}: still not a romscale {kind} after {timeout_s:.0f} s; start shard 0 first")
        time.sleep(poll_s)
    return final


def work_dir(
    target: str | os.PathLike, *, kind: str, inputs: Iterable[str | os.PathLike] = (), overwrite: bool = False,
    what: str = "output", meta: dict[str, Any] | None = None,
) -> Path:
    """A resumable output folder for long runs (a library of adapters being trained, a benchmark's
    work); returns its path.

    Missing or empty: created by `output_dir`, with a manifest marked `"resumable": true` whose file
    list stays empty (the parts inside are written one by one, each through `output_dir` or
    `write_json_output`, and verified on their own). An existing romscale folder of the same kind is
    resumed as it is, so finished parts are reused; with `overwrite` it is replaced by an empty one.
    Anything else is refused exactly as `check_target` refuses it."""
    inputs = list(inputs)
    final = check_target(target, kind=kind, inputs=inputs, overwrite=True, what=what)
    if final.is_dir() and any(final.iterdir()) and not overwrite:
        return final  # same kind (check_target refused any other): resume
    with output_dir(final, kind=kind, inputs=inputs, overwrite=overwrite, what=what,
                    meta={"resumable": True, **(meta or {})}):
        pass
    return final


def _write_file_output(path: str | os.PathLike, data: bytes, kind: str, inputs: Iterable[str | os.PathLike],
                       overwrite: bool, what: str) -> Path:
    inputs = list(inputs)
    final = check_target(path, kind=kind, inputs=inputs, overwrite=overwrite, what=what, is_file=True)
    _make_parent(final, what)
    with _locked(final, what):
        _recover(final)
        final = check_target(path, kind=kind, inputs=inputs, overwrite=overwrite, what=what, is_file=True)
        fd, name = tempfile.mkstemp(prefix=f".{final.name}.{_TMP}-", dir=final.parent)
        tmp = Path(name)
        try:
            os.fchmod(fd, 0o666 & ~_umask())
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            _swap_in(tmp, final)
        except BaseException:
            _remove(tmp)
            raise
    return final


def write_json_output(
    path: str | os.PathLike, obj: dict[str, Any], *, kind: str = "report", inputs: Iterable[str | os.PathLike] = (),
    overwrite: bool = False, what: str = "--json",
) -> Path:
    """Write a JSON report crash-safely under the same rules as folders (marked as romscale's)."""
    if not isinstance(obj, dict):
        raise TypeError("JSON outputs are objects")
    data = (json.dumps({JSON_MARKER: kind, **obj}, indent=2) + "\n").encode()
    return _write_file_output(path, data, kind, inputs, overwrite, what)


def write_png_output(path: str | os.PathLike, fig: Any, *, inputs: Iterable[str | os.PathLike] = (), overwrite: bool = False,
                     what: str = "plot", dpi: int = 120) -> Path:
    """Save a matplotlib figure as PNG under the output rules; the PNG carries a 'Software: romscale'
    text chunk, which is how a later run recognises it as its own."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": "romscale"})
    return _write_file_output(path, buf.getvalue(), "png", inputs, overwrite, what)


def write_text_output(path: str | os.PathLike, text: str, *, kind: str, inputs: Iterable[str | os.PathLike] = (),
                      overwrite: bool = False, what: str = "output") -> Path:
    """Write a text (markdown) report under the output rules; its first line is an HTML comment
    marking it as romscale's (invisible when the markdown is rendered)."""
    data = (TEXT_MARKER.format(kind=kind) + "\n" + text).encode()
    return _write_file_output(path, data, kind, inputs, overwrite, what)


# -- readers ----------------------------------------------------------------------------------------
def read_json(path: str | os.PathLike, error: type[Exception] = RomscaleError, hint: str = "") -> Any:
    """The one JSON reader: a missing, oversized or malformed file raises `error` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path} is missing{'; ' + hint if hint else ''}")
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise error(f"{path} is {size:,} bytes; a JSON file here is expected to be under {MAX_JSON_BYTES:,}")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise error(f"{path} is not valid JSON: {exc}") from exc


def member(folder: Path, name: Any, error: type[Exception], where: str) -> Path:
    """`folder/name` for a name read from a file, confined to the folder: relative, no `..`, no
    symbolic link anywhere on the way, a plain file."""
    if not isinstance(name, str) or not name or "\\" in name or "\x00" in name:
        raise error(f"{where}: file name {name!r} is not a plain relative name")
    pure = PurePosixPath(name)
    if pure.is_absolute() or any(part in ("..", ".", "") for part in name.split("/")):
        raise error(f"{where}: file name {name!r} leaves the folder {folder}; names must be relative, without '..'")
    p = folder
    for part in pure.parts:
        p = p / part
        if p.is_symlink():
            raise error(f"{where}: {p} is a symbolic link; files of a romscale folder must be plain files inside it")
    if not p.is_file():
        raise error(f"{p} is missing (listed in {where})")
    return p


def read_manifest(folder: str | os.PathLike, kind: str | tuple[str, ...], error: type[Exception], *, hash_files: bool = True,
                  skip_hash: Iterable[str] = ()) -> dict[str, Any]:
    """Read and check a romscale output's manifest against the folder, before anything else is read.

    The manifest must list exactly the files present (none missing, none extra, never empty), each a
    plain file inside the folder with the recorded size; sha256 is checked for every file unless
    `hash_files` is False, except `skip_hash` (files the caller verifies in its own way). `kind`: the
    kind expected, or a tuple of acceptable kinds."""
    kinds = (kind,) if isinstance(kind, str) else tuple(kind)
    kind = " or ".join(kinds)
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        raise error(f"{folder} is not a folder; expected a romscale {kind} folder")
    file = folder / MANIFEST
    if file.is_symlink():
        raise error(f"{file} is a symbolic link; expected a plain file")
    m = read_json(file, error, f"was {folder} written by romscale (a {kind})?")
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise error(f"{file} is not a romscale manifest (format {FORMAT!r} expected)")
    if m.get("version") != VERSION:
        raise error(f"{file}: manifest version {m.get('version')!r}; this romscale reads version {VERSION} (re-create the folder with this version)")
    if m.get("kind") not in kinds:
        raise error(f"{file}: this folder is a romscale {m.get('kind')!r}, expected a {kind}")
    files = m.get("files")
    if not isinstance(files, dict) or not files:
        raise error(f"{file}: 'files' must list every file of the folder; it is {'empty' if files == {} else 'missing or not an object'}")
    present = set(_list_files(folder)) - {MANIFEST}
    extra = sorted(present - set(files))
    if extra:
        raise error(f"{folder}: files {extra[:3]} are not listed in {MANIFEST}; a romscale folder holds exactly the files its manifest lists")
    skip = set(skip_hash)
    for name, entry in files.items():
        p = member(folder, name, error, str(file))
        if not isinstance(entry, dict) or not isinstance(entry.get("bytes"), int) or not isinstance(entry.get("sha256"), str):
            raise error(f"{file}: entry for {name!r} needs integer 'bytes' and a 'sha256' string")
        size = p.stat().st_size
        if size != entry["bytes"]:
            raise error(f"{p} has {size:,} bytes, {MANIFEST} says {entry['bytes']:,}: truncated or replaced")
    if hash_files:
        for name, entry in files.items():
            if name not in skip and sha256_file(folder / name) != entry["sha256"]:
                raise error(f"{folder / name} does not match its sha256 in {file}: the file is corrupt or was edited")
    return m
