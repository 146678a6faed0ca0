"""The files under a local folder, as scoring and the manifest sources list them: one walk, so
every lister skips, follows and flags the same things.

- Hidden names (a leading ".") are skipped, folders and files alike.
- Folders reached through a symlink are followed, each real folder once: a second route to a
  folder already walked (a link loop, a link to a sibling) is not walked again.
- A file that cannot be listed as an image gets a `problem` instead of being dropped:
  `bad_name` (its name is not valid UTF-8: Parquet, Arrow and JSON hold only UTF-8, and one such
  name used to stop a whole job) or `not_a_file` (a named pipe, socket or device: opening a pipe
  with no writer blocks for ever). Its `rel` shows undecodable bytes as \\xNN.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import Iterator

BAD_NAME = "bad_name"
NOT_A_FILE = "not_a_file"

_KINDS = ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"))


@dataclass(frozen=True)
class Found:
    rel: str  # path under the root, "/"-separated, always valid UTF-8
    path: str  # the path to open
    problem: str | None = None  # None, BAD_NAME or NOT_A_FILE
    detail: str = ""

    @property
    def name(self) -> str:
        return self.rel.rsplit("/", 1)[-1]


def readable(text: str) -> str:
    """`text` as valid UTF-8: bytes that are not (kept by Python as surrogates) become \\xNN."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return os.fsencode(text).decode("utf-8", "backslashreplace")


def walk_files(root: str | os.PathLike[str], *, recursive: bool = True) -> Iterator[Found]:
    """Every non-hidden file under `root`, in sorted order (folder by folder, depth first)."""
    root = os.fspath(root)
    yield from _walk(root, "", os.path.realpath(root), {os.path.realpath(root)}, recursive)


def _walk(folder: str, prefix: str, real: str, seen: set[str], recursive: bool) -> Iterator[Found]:
    with os.scandir(folder) as it:
        entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    for entry in entries:
        rel = prefix + entry.name
        if _is_dir(entry):
            if not recursive:
                continue
            sub = os.path.realpath(entry.path) if entry.is_symlink() else os.path.join(real, entry.name)
            if sub in seen:  # already walked by another route: a loop, or a second link to it
                continue
            seen.add(sub)
            yield from _walk(entry.path, rel + "/", sub, seen, recursive)
            continue
        shown = readable(rel)
        if shown != rel:
            yield Found(shown, entry.path, BAD_NAME, "the file name is not valid UTF-8 (another encoding, "
                                                     "e.g. Latin-1); rename it to score it")
        elif _is_file(entry) or _dangling(entry):
            yield Found(rel, entry.path)  # a dangling link, too: its reader reports it missing
        else:
            yield Found(rel, entry.path, NOT_A_FILE, f"not a regular file ({_kind(entry)})")


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows a link to a folder
    except OSError:  # a link loop of its own (a -> a): not a folder we can walk
        return False


def _is_file(entry: os.DirEntry) -> bool:
    try:
        return entry.is_file()
    except OSError:  # a link loop: _dangling lists it, and its read says why
        return False


def _dangling(entry: os.DirEntry) -> bool:
    """A symlink whose target is missing or itself a loop: listed, and its read says why."""
    if not entry.is_symlink():
        return False
    try:
        os.stat(entry.path)
        return False
    except OSError:
        return True


def _kind(entry: os.DirEntry) -> str:
    mode = entry.stat().st_mode
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")
