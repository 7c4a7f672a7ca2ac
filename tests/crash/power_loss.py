"""Power-loss states of a recorded checkpoint run, in the style of ALICE and CrashMonkey.

Why: ``kill -9`` keeps the page cache, so it never tests the fsync order. Here the checkpoint
writer runs once on a ``RecordingDisk`` (real I/O, every call that changes the disk appended to
a trace: mkdir, create, write, truncate, fsync, directory fsync, rename, unlink); then, for a
power cut after every prefix of the trace, ``crash_states`` builds the disk states POSIX allows:

* an operation followed (within the prefix) by the fsync that covers it persists: a write or
  truncate of file X by ``fsync(X)``; a create, rename or unlink in directory D by an fsync of D
  (a rename needs both of its directories);
* every other operation may be lost or kept, independently of the others and of their order
  (so a later one may persist without an earlier one); a lost write may also be torn: only some
  of its 4 KiB pages land. Operations that no longer apply (a rename whose source was lost) are
  dropped.

Files and directories are inodes, so renaming a directory carries whatever of its contents
persisted. Every state is written out to a real directory and handed to the real loader.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import random
import shutil
import threading

from horizon.checkpoint import Disk

PAGE_BYTES = 4096
ROOT_INO = 0
DATA_OPS = ("write", "truncate")
DIR_OPS = ("create", "rename", "unlink")


@dataclasses.dataclass(frozen=True)
class Op:
    kind: str             # create | write | truncate | fsync | fsync_dir | rename | unlink | committed
    ino: int = -1         # write, truncate, fsync: the file; fsync_dir: the directory; create, unlink: the parent
    name: str = ""        # create, unlink: the entry; rename: the source entry
    arg: object = None    # create: (new inode, "file" | "dir"); write: (offset, bytes); truncate: size;
                          # rename: (target parent inode, target name); committed: the step directory's name

    def dirs(self) -> tuple[int, ...]:
        """The directories whose fsync makes this directory operation durable."""
        return (self.ino, self.arg[0]) if self.kind == "rename" else (self.ino,)


class RecordingDisk(Disk):
    """Does the real I/O under ``root`` and appends each change to ``trace`` (thread-safe: the writer's
    I/O pool calls ``write`` from several threads; an op is recorded once the real call returned)."""

    def __init__(self, root: str) -> None:
        self.root = os.path.realpath(root)
        self.trace: list[Op] = []
        self._ino = {self.root: ROOT_INO}
        self._fd_ino: dict[int, int] = {}
        self._lock = threading.Lock()

    def _add(self, op: Op) -> None:
        with self._lock:
            self.trace.append(op)

    def _new_ino(self, path: str) -> int:
        with self._lock:
            ino = self._ino[os.path.realpath(path)] = len(self._ino)
        return ino

    def _parent(self, path: str) -> tuple[int, str]:
        path = os.path.realpath(path)
        return self._ino[os.path.dirname(path)], os.path.basename(path)

    def open_new(self, path, *, direct=False):
        fd = super().open_new(path, direct=direct)
        parent, name = self._parent(path)
        ino = self._new_ino(path)
        self._fd_ino[fd] = ino
        self._add(Op("create", parent, name, (ino, "file")))
        return fd

    def open_existing(self, path, *, direct=False):
        fd = super().open_existing(path, direct=direct)
        self._fd_ino[fd] = self._ino[os.path.realpath(path)]  # a recycled file: its inode and its old writes
        return fd

    def write(self, fd, data, offset):
        super().write(fd, data, offset)
        self._add(Op("write", self._fd_ino[fd], arg=(offset, bytes(data))))

    def truncate(self, fd, nbytes):
        super().truncate(fd, nbytes)
        self._add(Op("truncate", self._fd_ino[fd], arg=nbytes))

    def fsync(self, fd):
        super().fsync(fd)
        self._add(Op("fsync", self._fd_ino[fd]))

    def fsync_dir(self, path):
        super().fsync_dir(path)
        self._add(Op("fsync_dir", self._ino[os.path.realpath(path)]))

    def mkdir(self, path):
        super().mkdir(path)
        parent, name = self._parent(path)
        self._add(Op("create", parent, name, (self._new_ino(path), "dir")))

    def _renamed(self, src: str, dst: str) -> None:
        src, dst = os.path.realpath(src), os.path.realpath(dst)
        (src_parent, src_name), (dst_parent, dst_name) = self._parent(src), self._parent(dst)
        with self._lock:  # the inode keeps its number; every path under it moves
            for path in [p for p in self._ino if p == src or p.startswith(src + os.sep)]:
                self._ino[dst + path[len(src):]] = self._ino.pop(path)
        self._add(Op("rename", src_parent, src_name, (dst_parent, dst_name)))

    def rename(self, src, dst):
        real_dst = os.path.join(os.path.realpath(os.path.dirname(dst)), os.path.basename(dst))
        super().rename(src, dst)
        self._renamed(src, real_dst)

    def rename_new(self, src, dst):
        real_dst = os.path.join(os.path.realpath(os.path.dirname(dst)), os.path.basename(dst))
        super().rename_new(src, dst)
        self._renamed(src, real_dst)

    def remove_tree(self, path):
        path = os.path.realpath(path)
        for base, dirs, files in os.walk(path, topdown=False):  # children first, as rmtree unlinks them
            for name in files + dirs:
                self._add(Op("unlink", self._ino[base], name))
        parent, name = self._parent(path)
        super().remove_tree(path)
        self._add(Op("unlink", parent, name))

    def at(self, point):
        if point == "committed":  # the root was fsynced after the rename: that step must survive
            step_dirs = [op.arg[1] for op in self.trace if op.kind == "rename" and op.arg[1].startswith("step-")]
            self._add(Op("committed", arg=step_dirs[-1]))


def without(trace: list[Op], drop) -> list[Op]:
    """The trace of a protocol that does not make the calls ``drop(op, index)`` selects (negative controls)."""
    return [op for i, op in enumerate(trace) if not drop(op, i)]


def _coverer(trace: list[Op]) -> list[int]:
    """Per op, the index of the first later fsync that makes it durable (len(trace) if none does)."""
    never = len(trace)
    out = []
    for i, op in enumerate(trace):
        if op.kind in DATA_OPS:
            out.append(next((j for j in range(i + 1, never) if trace[j].kind == "fsync" and trace[j].ino == op.ino),
                            never))
        elif op.kind in DIR_OPS:
            out.append(max(next((j for j in range(i + 1, never)
                                 if trace[j].kind == "fsync_dir" and trace[j].ino == d), never) for d in op.dirs()))
        else:
            out.append(-1)  # fsyncs and markers change nothing on disk
    return out


@dataclasses.dataclass
class _Inode:
    kind: str
    changes: list = dataclasses.field(default_factory=list)  # a file: the writes and truncates that landed, in order
    entries: dict = dataclasses.field(default_factory=dict)  # a directory: name -> inode


def _apply(fs: dict[int, _Inode], index: int, op: Op, torn_pages: frozenset | None) -> None:
    """Apply ``op`` (the trace's ``index``-th) to ``fs``; file contents stay a list of changes until needed."""
    if op.kind == "create":
        ino, kind = op.arg
        fs.setdefault(ino, _Inode(kind))
        fs.setdefault(op.ino, _Inode("dir")).entries[op.name] = ino  # a lost mkdir leaves its inode unlinked
    elif op.kind in DATA_OPS:
        fs.setdefault(op.ino, _Inode("file")).changes.append((index, torn_pages))
    elif op.kind == "rename":
        ino = fs[op.ino].entries.pop(op.name, None) if op.ino in fs else None
        if ino is not None:
            fs.setdefault(op.arg[0], _Inode("dir")).entries[op.arg[1]] = ino
    elif op.kind == "unlink" and op.ino in fs:
        fs[op.ino].entries.pop(op.name, None)


def _tree(fs: dict[int, _Inode], ino: int = ROOT_INO, prefix: str = "") -> dict[str, tuple | None]:
    """Path -> the file's changes (None for a directory) of everything reachable from the root."""
    out = {}
    for name, child in sorted(fs[ino].entries.items()):
        path = prefix + name
        if fs[child].kind == "dir":
            out[path] = None
            out.update(_tree(fs, child, path + "/"))
        else:
            out[path] = tuple(fs[child].changes)
    return out


def _contents(trace: list[Op], changes: tuple) -> bytes:
    """A file's bytes after ``changes``: (trace index, pages landed or None for all)."""
    data = bytearray()
    for index, torn_pages in changes:
        op = trace[index]
        if op.kind == "truncate":
            del data[op.arg:]
            data.extend(bytes(op.arg - len(data)))
            continue
        offset, chunk = op.arg
        if len(data) < offset + len(chunk):
            data.extend(bytes(offset + len(chunk) - len(data)))
        for page in range(0, len(chunk), PAGE_BYTES):
            if torn_pages is None or page // PAGE_BYTES in torn_pages:
                data[offset + page:offset + page + PAGE_BYTES] = chunk[page:page + PAGE_BYTES]
    return bytes(data)


def _choices(trace: list[Op], loose: list[int], max_states: int, rng: random.Random):
    """Per loose op: None = lost, True = kept whole, a set of pages = torn. Every combination when
    there are at most ``max_states``, else the two extremes and random ones."""
    options = []
    for i in loose:
        op, opts = trace[i], [None, True]
        if op.kind == "write" and len(op.arg[1]) > PAGE_BYTES:
            pages = -(-len(op.arg[1]) // PAGE_BYTES)
            opts.append(frozenset(rng.sample(range(pages), max(1, pages // 2))))
        options.append(opts)
    total = 1
    for opts in options:
        total *= len(opts)
    if total <= max_states:
        yield from itertools.product(*options)
        return
    yield tuple(opts[0] for opts in options)
    yield tuple(opts[1] for opts in options)
    for _ in range(max_states - 2):
        yield tuple(rng.choice(opts) for opts in options)


def crash_states(trace: list[Op], *, max_states_per_point: int = 48, seed: int = 0):
    """Yield each distinct (disk state, newest step committed before the cut) a power cut may leave.

    A state is ``{path: file bytes, or None for a directory}``; the step is a directory name, or
    None before the first commit."""
    rng = random.Random(seed)
    coverer = _coverer(trace)
    seen: set[tuple] = set()
    committed = None
    for cut in range(len(trace) + 1):
        if cut and trace[cut - 1].kind == "committed":
            committed = trace[cut - 1].arg
        mutations = [i for i in range(cut) if coverer[i] >= 0]
        loose = [i for i in mutations if coverer[i] >= cut]
        for choice in _choices(trace, loose, max_states_per_point, rng):
            chosen = dict(zip(loose, choice))
            fs = {ROOT_INO: _Inode("dir")}
            for i in mutations:
                pick = chosen.get(i, True)
                if pick is not None:
                    _apply(fs, i, trace[i], None if pick is True else pick)
            tree = _tree(fs)
            key = (tuple(sorted(tree.items())), committed)
            if key not in seen:
                seen.add(key)
                yield {p: None if c is None else _contents(trace, c) for p, c in tree.items()}, committed


def materialize(tree: dict[str, bytes | None], directory: str) -> None:
    """Write a state out as real files under ``directory`` (created fresh)."""
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory)
    for path, data in tree.items():
        full = os.path.join(directory, path)
        if data is None:
            os.makedirs(full, exist_ok=True)
        else:
            with open(full, "wb") as f:
                f.write(data)
