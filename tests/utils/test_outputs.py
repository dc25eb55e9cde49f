"""Safe outputs: what romscale did not write is never destroyed, inputs are never written over or
into, replaces are crash-safe, and concurrent writers cannot both win."""

import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import pytest

from romscale.utils import outputs
from romscale.utils.outputs import MANIFEST, OutputError, output_dir, read_manifest, write_json_output


def _write(target, text="new", kind="thing", **kw):
    with output_dir(target, kind=kind, **kw) as out:
        (out.path / "data.txt").write_text(text)
    return Path(target)


def _siblings(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir())


def test_manifest_lists_every_file_with_size_and_hash(tmp_path):
    with output_dir(tmp_path / "o", kind="thing", meta={"note": 1}) as out:
        (out.path / "a.txt").write_text("a")
        (out.path / "sub").mkdir()
        (out.path / "sub" / "b.bin").write_bytes(b"bb")
    m = read_manifest(tmp_path / "o", "thing", RuntimeError)
    assert m["kind"] == "thing" and m["note"] == 1
    assert set(m["files"]) == {"a.txt", "sub/b.bin"} and m["files"]["sub/b.bin"]["bytes"] == 2
    assert _siblings(tmp_path / "o") == ["o"]  # no temporary folder or lock file left


def test_refuses_a_folder_romscale_did_not_write(tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("precious")
    for overwrite in (False, True):
        with pytest.raises(OutputError, match="not a romscale output"):
            _write(user, overwrite=overwrite)
    assert (user / "notes.txt").read_text() == "precious" and _siblings(user) == ["mine"]


def test_replaces_only_its_own_kind_and_only_with_overwrite(tmp_path):
    t = _write(tmp_path / "o", "old")
    with pytest.raises(OutputError, match="--overwrite"):
        _write(t, "new")
    with pytest.raises(OutputError, match="romscale thing output, not a other"):
        _write(t, "new", kind="other", overwrite=True)
    _write(t, "new", overwrite=True)
    assert (t / "data.txt").read_text() == "new" and _siblings(t) == ["o"]


def test_an_empty_folder_is_taken(tmp_path):
    (tmp_path / "empty").mkdir()
    assert (_write(tmp_path / "empty") / "data.txt").is_file()


@pytest.mark.parametrize("where", ["same", "inside", "parent"])
def test_never_writes_over_or_into_an_input(tmp_path, where):
    src = _write(tmp_path / "P" / "src", "input")
    target = {"same": src, "inside": src / "x", "parent": tmp_path / "P"}[where]
    with pytest.raises(OutputError, match="input"):
        _write(target, inputs=[src], overwrite=True)
    assert (src / "data.txt").read_text() == "input"


def test_refuses_files_links_and_the_current_folder(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="not a folder"):
        _write(tmp_path / "file", overwrite=True)
    real = _write(tmp_path / "real")
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(OutputError, match="symbolic link"):
        _write(tmp_path / "link", overwrite=True)
    monkeypatch.chdir(real)
    with pytest.raises(OutputError, match="current folder"):
        _write(Path("."), overwrite=True)
    assert (tmp_path / "file").read_text() == "x" and (real / "data.txt").read_text() == "new"


def test_a_failed_write_leaves_the_old_output_and_no_debris(tmp_path):
    t = _write(tmp_path / "o", "old")
    with pytest.raises(RuntimeError):
        with output_dir(t, kind="thing", overwrite=True) as out:
            (out.path / "data.txt").write_text("half")
            raise RuntimeError("killed")
    assert (t / "data.txt").read_text() == "old" and _siblings(t) == ["o"]


def test_the_swap_is_one_atomic_exchange(tmp_path, monkeypatch):
    """Between 'new complete' and 'old removed' the target is always a complete output."""
    t = _write(tmp_path / "o", "old")
    seen = []
    real_remove = outputs._remove

    def spy(p):
        seen.append((t / "data.txt").read_text())  # called right after the exchange
        real_remove(p)

    monkeypatch.setattr(outputs, "_remove", spy)
    _write(t, "new", overwrite=True)
    assert seen[0] == "new"


def test_an_interrupted_swap_is_finished_or_undone_by_the_next_writer(tmp_path, monkeypatch):
    """Without renameat2 the old folder is renamed aside first; a kill right then leaves no target.
    The next writer restores it (or finishes the swap) before anything else."""
    t = _write(tmp_path / "o", "old")
    monkeypatch.setattr(outputs, "_exchange", lambda a, b: False)
    real_rename = os.rename
    calls = []

    def dying_rename(a, b):
        calls.append(b)
        if len(calls) == 3:  # tmp -> new, target -> old, *kill* before new -> target
            raise KeyboardInterrupt("kill -9")
        real_rename(a, b)

    monkeypatch.setattr(os, "rename", dying_rename)
    with pytest.raises(KeyboardInterrupt):
        _write(t, "new", overwrite=True)
    monkeypatch.setattr(os, "rename", real_rename)
    assert not t.exists()  # the window the exchange closes on Linux
    # The complete new folder is kept aside (the error path removed only the temp name).
    outputs._recover(t)
    assert (t / "data.txt").read_text() in ("new", "old") and _siblings(t) == ["o"]
    read_manifest(t, "thing", RuntimeError)


def test_recover_restores_the_old_output_when_the_new_one_never_completed(tmp_path):
    t = _write(tmp_path / "o", "old")
    os.rename(t, tmp_path / ".o.romscale-old-abc")
    (tmp_path / ".o.romscale-tmp-def").mkdir()  # an incomplete new folder
    _write(t, "newer", overwrite=True)  # recovers first, then replaces
    assert (t / "data.txt").read_text() == "newer" and _siblings(t) == ["o"]


def test_a_second_writer_is_refused_while_the_first_writes(tmp_path):
    t = tmp_path / "o"
    with output_dir(t, kind="thing") as out:
        (out.path / "data.txt").write_text("first")
        with pytest.raises(OutputError, match="another romscale process is writing"):
            _write(t, "second", overwrite=True)
    assert (t / "data.txt").read_text() == "first" and _siblings(t) == ["o"]


def _slow_writer(target, barrier, results):
    barrier.wait()
    try:
        with output_dir(target, kind="thing", overwrite=True) as out:
            (out.path / "data.txt").write_text(str(os.getpid()))
            time.sleep(1.0)
        results.put("ok")
    except OutputError as exc:
        results.put(f"refused: {exc}")


def test_concurrent_writers_one_wins_nothing_left_behind(tmp_path):
    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_slow_writer, args=(tmp_path / "o", barrier, results)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    got = sorted(results.get(timeout=5) for _ in procs)
    assert got[0] == "ok" and all(r.startswith("refused: ") and "another romscale process" in r for r in got[1:]), got
    assert _siblings(tmp_path / "o") == ["o"]
    read_manifest(tmp_path / "o", "thing", RuntimeError)


def test_json_outputs_follow_the_same_rules(tmp_path):
    user = tmp_path / "adapter_config.json"
    user.write_text('{"r": 8}')
    for overwrite in (False, True):
        with pytest.raises(OutputError, match="not written by romscale"):
            write_json_output(user, {"a": 1}, overwrite=overwrite)
    assert user.read_text() == '{"r": 8}'
    p = write_json_output(tmp_path / "r.json", {"a": 1})
    with pytest.raises(OutputError, match="--overwrite"):
        write_json_output(p, {"a": 2})
    write_json_output(p, {"a": 2}, overwrite=True)
    assert json.loads(p.read_text())["a"] == 2
    src = _write(tmp_path / "in")
    with pytest.raises(OutputError, match="input"):
        write_json_output(src / "x.json", {"a": 1}, inputs=[src])
    assert _siblings(p) == sorted(["adapter_config.json", "r.json", "in"])


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m, f: m.update(files={}), "'files' must list every file"),
        (lambda m, f: m["files"].pop("data.txt"), "not listed"),
        (lambda m, f: m["files"].update({"gone.txt": {"bytes": 1, "sha256": "0"}}), "missing"),
        (lambda m, f: m["files"].update({"/etc/passwd": {"bytes": 1, "sha256": "0"}}), "leaves the folder"),
        (lambda m, f: m["files"].update({"../o/data.txt": {"bytes": 1, "sha256": "0"}}), "leaves the folder"),
        (lambda m, f: m["files"]["data.txt"].update(bytes=99), "truncated or replaced"),
        (lambda m, f: (f / "data.txt").write_text("wen"), "sha256"),
        (lambda m, f: (f / "extra.txt").write_text("x"), "not listed"),
        (lambda m, f: m.update(kind="other"), "expected a thing"),
        (lambda m, f: m.update(version=1), "version"),
    ],
)
def test_read_manifest_rejects(tmp_path, edit, match):
    with output_dir(tmp_path / "o", kind="thing") as out:
        (out.path / "data.txt").write_text("new")
        (out.path / "more.txt").write_text("more")
    t = tmp_path / "o"
    m = json.loads((t / MANIFEST).read_text())
    edit(m, t)
    (t / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(RuntimeError, match=match):
        read_manifest(t, "thing", RuntimeError)


def test_read_manifest_refuses_a_symlink_out_of_the_folder(tmp_path):
    t = _write(tmp_path / "o")
    outside = tmp_path / "outside.txt"
    outside.write_text("new")
    (t / "data.txt").unlink()
    (t / "data.txt").symlink_to(outside)
    with pytest.raises(RuntimeError, match="symbolic link"):
        read_manifest(t, "thing", RuntimeError)


def test_png_outputs_are_recognised_by_their_text_chunk(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from romscale.utils.outputs import write_png_output

    fig = plt.figure()
    p = write_png_output(tmp_path / "a.png", fig)
    with pytest.raises(OutputError, match="--overwrite"):
        write_png_output(p, fig)
    write_png_output(p, fig, overwrite=True)
    theirs = tmp_path / "theirs.png"
    fig.savefig(theirs)  # a PNG romscale did not write
    with pytest.raises(OutputError, match="not written by romscale"):
        write_png_output(theirs, fig, overwrite=True)
    plt.close(fig)


def test_an_unwritable_place_is_one_clear_error(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputError, match=r"afile/sub/r.json: cannot create its folder"):
        write_json_output(tmp_path / "afile" / "sub" / "r.json", {"a": 1})
    with pytest.raises(OutputError, match="cannot create its folder"):
        _write(tmp_path / "afile" / "o")
    assert (tmp_path / "afile").read_text() == "x"
