"""cxrray.files.walk_files: the one walk scoring and the manifest sources list folders with."""
from __future__ import annotations

import os
from pathlib import Path

from cxrray.files import BAD_NAME, NOT_A_FILE, walk_files


def test_the_walk_follows_linked_folders_once_flags_what_it_cannot_open_and_skips_hidden(tmp_path: Path) -> None:
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    (root / "real").mkdir(parents=True)
    (root / "real" / "a.png").write_bytes(b"x")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "h.png").write_bytes(b"x")
    (root / ".dot.png").write_bytes(b"x")
    elsewhere.mkdir()
    (elsewhere / "b.png").write_bytes(b"x")
    (root / "linked").symlink_to(elsewhere)  # a folder reached through a link: walked
    (root / "again").symlink_to(root / "real")  # a link inside the root: its folder keeps its own name
    (root / "up").symlink_to(tmp_path)  # a link to a parent of the root: it would pull in the siblings
    (root / "real" / "loop").symlink_to(root)  # a loop back to the root
    (root / "self").symlink_to(root / "self")  # a link to itself
    (root / "dangling.png").symlink_to(tmp_path / "gone.png")
    os.mkfifo(root / "pipe.png")
    latin = os.fsdecode(b"caf\xe9.png")  # a Latin-1 name: not UTF-8
    (root / latin).write_bytes(b"x")

    found = {f.rel: f for f in walk_files(root)}
    assert sorted(found) == ["caf\\xe9.png", "dangling.png", "linked/b.png", "pipe.png", "real/a.png", "self"]
    assert found["real/a.png"].path == str(root / "real" / "a.png")  # under its own name, not the link's
    assert found["caf\\xe9.png"].problem == BAD_NAME and "not valid UTF-8" in found["caf\\xe9.png"].detail
    assert found["pipe.png"].problem == NOT_A_FILE and "named pipe" in found["pipe.png"].detail
    assert found["linked/b.png"].problem is None and Path(found["linked/b.png"].path).read_bytes() == b"x"
    assert found["dangling.png"].problem is None and found["self"].problem is None  # their readers say why
    for f in found.values():
        f.rel.encode("utf-8")  # every rel can go into Arrow, Parquet and JSON
    assert [f.rel for f in walk_files(root, recursive=False)] == ["caf\\xe9.png", "dangling.png", "pipe.png", "self"]


def test_a_subfolder_that_cannot_be_listed_is_left_out_with_a_warning(tmp_path: Path, monkeypatch, caplog) -> None:
    """Every ext4 volume has a lost+found only root can list; it stopped the whole walk."""
    import logging

    from cxrray import files

    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "lost+found").mkdir()
    (tmp_path / "lost+found" / "b.png").write_bytes(b"x")
    (tmp_path / "z").mkdir()
    (tmp_path / "z" / "c.png").write_bytes(b"x")
    real_scandir = os.scandir

    def scandir(path):  # as for a user without permission (the tests run as root, where none bites)
        if os.fspath(path).endswith("lost+found"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(files.os, "scandir", scandir)
    with caplog.at_level(logging.WARNING, logger="cxrray.files"):
        assert [f.rel for f in walk_files(tmp_path)] == ["a.png", "z/c.png"]
    assert any("cannot list" in r.getMessage() and "lost+found" in r.getMessage() for r in caplog.records)


def test_an_excluded_folder_is_not_entered_by_any_route(tmp_path: Path) -> None:
    root, other = tmp_path / "in", tmp_path / "other"
    (root).mkdir()
    (root / "a.png").write_bytes(b"x")
    (other / "res").mkdir(parents=True)
    (other / "res" / "_lock").write_bytes(b"")
    (other / "b.png").write_bytes(b"x")
    (root / "link").symlink_to(other)
    assert [f.rel for f in walk_files(root, exclude=root / "link" / "res")] == ["a.png", "link/b.png"]
