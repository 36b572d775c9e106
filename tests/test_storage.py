"""Files whole or absent: atomic writes, a full disk, unwritable places, temporaries of dead processes."""

import errno
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fastllc import FastLLCError, storage


@pytest.fixture
def full_disk(monkeypatch):
    """Every file write stores half its bytes, then fails as a full disk does."""

    def write_half(path, data):
        with open(path, "xb") as file:
            file.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(storage, "_write_file", write_half)


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


def test_atomic_write_replaces_whole_files(tmp_path):
    target = tmp_path / "deep" / "record.json"
    storage.write_atomically(target, "first\n")
    storage.write_atomically(target, b"second\n")
    assert target.read_text() == "second\n"
    assert leftovers(target.parent) == ["record.json"]


def test_full_disk_is_one_line_and_keeps_the_old_file(tmp_path, full_disk):
    target = tmp_path / "record.json"
    target.write_text("old\n")
    with pytest.raises(FastLLCError, match=r"^no space left on device while writing .*record\.json: free space and rerun"):
        storage.write_atomically(target, "new and longer\n")
    assert target.read_text() == "old\n" and leftovers(tmp_path) == ["record.json"]  # half-written temporary gone
    with pytest.raises(FastLLCError, match="no space left on device"):
        storage.publish_file_once(tmp_path / "other.json", "x" * 100)
    assert leftovers(tmp_path) == ["record.json"]


def test_other_write_errors_name_the_path(tmp_path, monkeypatch):
    def refuse(path, data):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(storage, "_write_file", refuse)
    with pytest.raises(FastLLCError, match=r"cannot write .*x\.json: read-only file system$"):
        storage.write_atomically(tmp_path / "x.json", "{}")
    assert leftovers(tmp_path) == []


def test_first_complete_file_wins(tmp_path):
    target = tmp_path / "job.json"
    assert storage.publish_file_once(target, "mine\n") is True
    assert storage.publish_file_once(target, "theirs\n") is False
    assert target.read_text() == "mine\n" and leftovers(tmp_path) == ["job.json"]


def test_first_complete_directory_wins(tmp_path):
    target = tmp_path / "run"
    for content in ("first", "second"):
        tmp = storage.temporary_sibling(target)
        tmp.mkdir()
        (tmp / "file").write_text(content)
        storage.publish_directory(tmp, target)
    assert (target / "file").read_text() == "first" and leftovers(tmp_path) == ["run"]


def test_move_aside_keeps_the_damaged_file(tmp_path):
    damaged = tmp_path / "job.json"
    damaged.write_text("{trunc")
    aside = storage.move_aside(damaged)
    assert aside.name.startswith("job.json.damaged-") and aside.read_text() == "{trunc" and not damaged.exists()
    assert storage.move_aside(damaged) is None  # already moved by someone else: nothing to do


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: the pid now names no process
    return child.pid


def test_temporaries_of_dead_processes_are_removed_and_of_live_ones_kept(tmp_path):
    live = subprocess.Popen(["sleep", "60"])
    try:
        dead = dead_pid()
        (tmp_path / f".run.tmp-{dead}").mkdir()  # the name an older version gave a run in progress
        (tmp_path / f".run.tmp-{dead}" / "config.json").write_text("{}")
        (tmp_path / f".job.json.tmp-{dead}-3").write_text("")  # an empty temporary left by a SIGKILL
        (tmp_path / f".job.json.tmp-{live.pid}-0").write_text("{")  # still being written
        (tmp_path / f".run.tmp-{os.getpid()}-7").mkdir()  # ours
        (tmp_path / "results.tmp-1").write_text("not hidden, not ours")
        removed = storage.remove_stale_temporaries(tmp_path)
        assert sorted(p.name for p in removed) == [f".job.json.tmp-{dead}-3", f".run.tmp-{dead}"]
        assert leftovers(tmp_path) == sorted([f".job.json.tmp-{live.pid}-0", f".run.tmp-{os.getpid()}-7", "results.tmp-1"])
    finally:
        live.kill()
        live.wait()
    assert storage.remove_stale_temporaries(tmp_path / "absent") == []


@pytest.mark.parametrize("where,message", [
    ("/proc/fastllc-run", "cannot write /proc/fastllc-run: /proc is not writable"),
    ("FILE/run", "FILE is not a directory"),
    ("FILE/a/b", "FILE is not a directory"),
    ("FILE", "it exists and is not a directory"),
])
def test_unwritable_directories_are_named(tmp_path, where, message):
    (tmp_path / "FILE").write_text("a file")
    where = where.replace("FILE", str(tmp_path / "FILE"))
    with pytest.raises(FastLLCError, match=message.replace("FILE", str(tmp_path / "FILE"))):
        storage.check_writable_dir(where)
    assert leftovers(tmp_path) == ["FILE"]


def test_unwritable_files_are_named(tmp_path):
    (tmp_path / "FILE").write_text("a file")
    with pytest.raises(FastLLCError, match="/proc is not writable"):
        storage.check_writable_file("/proc/plot.png")
    with pytest.raises(FastLLCError, match="is not a directory"):
        storage.check_writable_file(tmp_path / "FILE" / "plot.png")
    with pytest.raises(FastLLCError, match="it is a directory; give a file name"):
        storage.check_writable_file(tmp_path)
    storage.check_writable_file(tmp_path / "FILE")  # an existing file: fine, and left as it was
    storage.check_writable_file(tmp_path / "new" / "deeper" / "plot.png")
    storage.check_writable_dir(tmp_path / "new" / "run")
    assert leftovers(tmp_path) == ["FILE"] and (tmp_path / "FILE").read_text() == "a file"  # nothing created


def test_read_only_directory_is_named(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.geteuid() == 0:  # root writes through permission bits: refuse the probe as the kernel would for a user
        real_mkdir = os.mkdir

        def mkdir(path, *args, **kwargs):
            if Path(path).parent == locked:
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_mkdir(path, *args, **kwargs)

        monkeypatch.setattr(os, "mkdir", mkdir)
    with pytest.raises(FastLLCError, match="locked is not writable \\(permission denied\\)"):
        storage.check_writable_dir(locked / "run")
    assert list(locked.iterdir()) == []


def test_a_real_full_disk_leaves_nothing_behind(tmp_path):
    """Training onto a 40 kB tmpfs (mounted in a user namespace where the system allows it)."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("no user namespaces here to mount a small tmpfs")
    disk = tmp_path / "disk"
    disk.mkdir()
    script = textwrap.dedent(f"""
        import os
        from fastllc import FastLLCError, TrainConfig, train
        try:
            train(TrainConfig(p=5, embed=4, hidden=8, batches=30, checkpoints=10), {str(disk / "run")!r})
            print("TRAINED")
        except FastLLCError as err:
            print("ERROR", err)
        print("LEFT", sorted(os.listdir({str(disk)!r})))
    """)
    command = f"mount -t tmpfs -o size=40k tmpfs {disk} && exec {sys.executable} -c \"$0\""
    result = subprocess.run(["unshare", "-rm", "sh", "-c", command, script], capture_output=True, text=True, timeout=120)
    if "mount" in result.stderr and result.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    assert "Traceback" not in result.stderr, result.stderr
    assert f"ERROR no space left on device while writing {disk / 'run'}: free space and rerun" in result.stdout, result.stdout
    assert "LEFT []" in result.stdout, result.stdout
