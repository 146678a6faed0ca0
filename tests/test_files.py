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
    (root / "zz_again").symlink_to(root / "real")  # a second route to a folder walked already: not again
    (root / "real" / "loop").symlink_to(root)  # a loop back to the root
    (root / "self").symlink_to(root / "self")  # a link to itself
    (root / "dangling.png").symlink_to(tmp_path / "gone.png")
    os.mkfifo(root / "pipe.png")
    latin = os.fsdecode(b"caf\xe9.png")  # a Latin-1 name: not UTF-8
    (root / latin).write_bytes(b"x")

    found = {f.rel: f for f in walk_files(root)}
    assert sorted(found) == ["caf\\xe9.png", "dangling.png", "linked/b.png", "pipe.png", "real/a.png", "self"]
    assert found["caf\\xe9.png"].problem == BAD_NAME and "not valid UTF-8" in found["caf\\xe9.png"].detail
    assert found["pipe.png"].problem == NOT_A_FILE and "named pipe" in found["pipe.png"].detail
    assert found["linked/b.png"].problem is None and Path(found["linked/b.png"].path).read_bytes() == b"x"
    assert found["dangling.png"].problem is None and found["self"].problem is None  # their readers say why
    for f in found.values():
        f.rel.encode("utf-8")  # every rel can go into Arrow, Parquet and JSON
    assert [f.rel for f in walk_files(root, recursive=False)] == ["caf\\xe9.png", "dangling.png", "pipe.png", "self"]
