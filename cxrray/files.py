"""The files under a local folder, as scoring and the manifest sources list them: one walk, so
every lister skips, follows and flags the same things.

- Hidden names (a leading ".") are skipped, folders and files alike.
- A symlink to a folder outside the root is followed, each real folder once. A link to a folder
  inside the root (walked under its own name already, or to be) or to one of the root's parents
  (a loop, or the root's siblings) is not: a file's id is its path under its real folder, so
  adding a link never renames files.
- A subfolder that cannot be listed (no permission: `lost+found`) is left out with a warning.
- A file that cannot be listed as an image gets a `problem` instead of being dropped:
  `bad_name` (its name is not valid UTF-8: Parquet, Arrow and JSON hold only UTF-8, and one such
  name used to stop a whole job) or `not_a_file` (a named pipe, socket or device: opening a pipe
  with no writer blocks for ever). Its `rel` shows undecodable bytes as \\xNN.
"""
from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from typing import Iterator

log = logging.getLogger(__name__)

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


def walk_files(root: str | os.PathLike[str], *, recursive: bool = True,
               exclude: str | os.PathLike[str] | None = None) -> Iterator[Found]:
    """Every non-hidden file under `root`, in sorted order (folder by folder, depth first).
    exclude: a folder never entered, by whatever route (a job's own output inside its input)."""
    root = os.fspath(root)
    real = os.path.realpath(root)
    seen = {real} | ({os.path.realpath(exclude)} if exclude else set())
    yield from _walk(root, "", real, _Walk(real, seen, recursive))


@dataclass
class _Walk:
    root: str  # real path
    seen: set[str]  # real folders walked or never to walk
    recursive: bool

    def follows(self, link_target: str) -> bool:
        """A linked folder is walked when it is outside the root and not one of its parents."""
        inside = link_target == self.root or link_target.startswith(self.root.rstrip("/") + "/")
        above = self.root.startswith(link_target.rstrip("/") + "/")
        return not inside and not above


def _walk(folder: str, prefix: str, real: str, walk: _Walk) -> Iterator[Found]:
    try:
        with os.scandir(folder) as it:
            entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as e:
        if not prefix:
            raise  # the root itself: the caller's error
        log.warning("cannot list %s (%s); its files are left out", readable(folder), e.strerror or e)
        return
    for entry in entries:
        rel = prefix + entry.name
        if _is_dir(entry):
            if not walk.recursive:
                continue
            link = entry.is_symlink()
            sub = os.path.realpath(entry.path) if link else os.path.join(real, entry.name)
            if sub in walk.seen or (link and not walk.follows(sub)):
                continue
            walk.seen.add(sub)
            yield from _walk(entry.path, rel + "/", sub, walk)
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
