"""The worker's read-only FUSE view of the cluster's storage, served through the block cache.

Tree (every file read-only, 0o444; every directory 0o555; one fixed mtime, the mount time)::

    /files/<32 hex>            a stored file by id; readdir lists the cached ones, but any
                               id the cluster knows can be looked up
    /jobs/<job hex>/<name>     a job's files by readable name ('a/b' names make directories)

Theory of operation: stored files are immutable, so the kernel may keep a file's pages across
opens (``keep_cache``), sizes are memoised forever, and only the job listings (which grow) are
memoised briefly. A read asks the cache to make its blocks present and then hands libfuse the
cache file's fd and offset (``read_buf`` with an fd buffer): the bytes go from the page cache to
/dev/fuse in C and never pass through Python, so Python's cost is per request, not per byte.
An open pins the file in the cache (the fd must outlive the request); release unpins.
Each open handle has a ``ReadAhead``: while its reads are sequential the cache prefetches up to
``Tuning.cache_read_ahead`` bytes past them on its pool, several fetches in flight, so a request
usually finds its blocks present (first read of 1 GiB from a storage node: ~142 -> ~280 MB/s).

mfusepy binds libfuse2 if both are installed: ``FUSE_LIBRARY_NAME=fuse3`` is set before it is
imported, here, and ``fuse_available()`` refuses a process where libfuse2 got loaded anyway.

Performance (1 GiB complete in the cache, ``dd bs=128K``, 2 vCPUs, kernel 6.18, libfuse 3.14;
the direct read of the cache file runs at ~10 GB/s from the page cache):

- The first read through a fresh mount costs one extra memory copy (into the FUSE inode's page
  cache) and a request per readahead window: ~1.3-2 GB/s with the defaults, against
  ~0.4-0.6 GB/s for bytes returned from Python with the kernel's 128 KiB readahead. What got
  it there: the fd buffer (no Python copy), splice (no copy through a malloc'd buffer, which
  glibc mmaps and faults in afresh for every 1 MiB request), readahead raised to ~4 MiB so
  that a request carries ~1 MiB, requests capped to what one pipe can splice.
- Later reads come from the kernel page cache (``keep_cache``): ~50-60 % of the direct read
  on the second pass (the kernel moves the pages to its active list on their second use) and
  ~75-95 % from the third. ``direct_io`` instead gives a steady ~1-2.4 GB/s, never better;
  without ``keep_cache`` every open starts cold.
- ``threads`` and ``nothreads`` measure alike here; threads stay the default so that one
  slow fetch does not stall every other request on the mount.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import itertools
import logging
import os
import re
import select
import shutil
import signal
import stat
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proto.fileids import is_hex_id
from worker.cache import BLOCK, READ_AHEAD_MAX, BlockCache, ReadAhead, StorageView

if not os.environ.get("FUSE_LIBRARY_PATH"):
    os.environ["FUSE_LIBRARY_NAME"] = "fuse3"
try:
    import mfusepy
except (OSError, AttributeError) as _e:  # no libfuse at all, or one mfusepy cannot bind
    mfusepy = None
    _IMPORT_ERROR = f"mfusepy cannot load libfuse: {_e}"
else:
    _IMPORT_ERROR = ""

log = logging.getLogger("cluster.worker")

LISTING_TTL = 2.0  # seconds a job listing is reused: jobs gain files, so not forever
_MEMO_LIMIT = 100_000  # memo entries before a reset (each ~100 bytes)
_DIR_MODE = stat.S_IFDIR | 0o555
_FILE_MODE = stat.S_IFREG | 0o444

# libfuse3's struct fuse_buf / fuse_bufvec (fuse_common.h). mfusepy declares fuse_bufvec.buf as
# a pointer, but C has the first fuse_buf inline, so the layout is ours.
_FUSE_BUF_IS_FD = 1 << 1
_FUSE_BUF_FD_SEEK = 1 << 2
_FUSE_BUF_FD_RETRY = 1 << 3
_FUSE_CAP_SPLICE_WRITE = 1 << 7
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _request_max() -> int:
    """The largest read request whose reply libfuse can splice through one pipe.

    libfuse wants a pipe of 3 pages + 16 header bytes + the data (fuse_send_data_iov).
    """
    try:
        with open("/proc/sys/fs/pipe-max-size", encoding="ascii") as fh:
            pipe_max = int(fh.read())
    except (OSError, ValueError):
        pipe_max = 1 << 20
    return max(32 * _PAGE, (pipe_max - 3 * _PAGE - 16) // _PAGE * _PAGE)


_REQUEST_MAX = _request_max()


class _FuseBuf(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_size_t),
        ("flags", ctypes.c_int),
        ("mem", ctypes.c_void_p),
        ("fd", ctypes.c_int),
        ("pos", ctypes.c_int64),
    ]


class _FuseBufvec(ctypes.Structure):
    _fields_ = [
        ("count", ctypes.c_size_t),
        ("idx", ctypes.c_size_t),
        ("off", ctypes.c_size_t),
        ("buf", _FuseBuf),
    ]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.calloc.restype = ctypes.c_void_p
_libc.calloc.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
# libfuse free()s the vector after replying: allocate it with the C allocator. Room to spare in
# case a later libfuse grows struct fuse_buf (3.17 did not, but zeroes are the safe default).
_BUFVEC_ALLOC = 2 * ctypes.sizeof(_FuseBufvec)
_FD_FLAGS = _FUSE_BUF_IS_FD | _FUSE_BUF_FD_SEEK | _FUSE_BUF_FD_RETRY

_Base: Any = mfusepy.Operations if mfusepy is not None else object


def _fuse_error(code: int) -> OSError:
    return mfusepy.FuseOSError(code) if mfusepy is not None else OSError(code, os.strerror(code))


def _parse_id(name: str) -> bytes | None:
    return bytes.fromhex(name) if is_hex_id(name) else None


def _job_tree(files: dict[str, bytes]) -> dict[str, Any]:
    """Readable names -> a tree of dicts (directories) and fids (files)."""
    root: dict[str, Any] = {}
    for name, fid in sorted(files.items()):
        parts = [p for p in name.split("/") if p not in ("", ".", "..")]
        node = root
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                break  # a file already has this name; the deeper one is hidden
            node = child
        else:
            if parts and parts[-1] not in node:
                node[parts[-1]] = fid
    return root


@dataclass(frozen=True, slots=True)
class Tuning:
    """How reads reach the kernel. The defaults are the fastest correct setup measured here."""

    zero_copy: bool = True  # read_buf with an fd buffer: the bytes never enter Python
    splice: bool = True  # libfuse splices that fd into /dev/fuse: no copy through user memory
    direct_io: bool = False  # True bypasses the page cache: every read(2) becomes a request
    readahead: int = 4 * _REQUEST_MAX  # bytes; the kernel's 128 KiB default means 128 KiB requests
    # bytes the cache prefetches past a sequential reader (0: none); see worker.cache.ReadAhead
    cache_read_ahead: int = READ_AHEAD_MAX
    # list files/ (the cached ids) and jobs/ (every job with files)? Off in a worker's own mount,
    # which the tasks of every owner share: a task then reaches a file or a job's directory only
    # by an id it was given (doc/security.md), as it reads its own inputs
    enumerate: bool = True


class StorageFS(_Base):
    """A read-only mfusepy filesystem over ``view`` (names, sizes, bytes) and ``cache`` (blocks).

    Mount it with ``mount()``, which passes ``raw_fi=True`` so that open can set ``keep_cache``.
    ``mountpoint`` lets init raise the mount's readahead (root only; skipped otherwise).
    """

    use_ns = True

    def __init__(
        self,
        view: StorageView,
        cache: BlockCache,
        *,
        tuning: Tuning = Tuning(),
        mountpoint: str | None = None,
        listing_ttl: float = LISTING_TTL,
        clock=time.monotonic,
    ) -> None:
        self._view = view
        self._cache = cache
        self._tuning = tuning
        self._mountpoint = mountpoint
        self._ttl = listing_ttl
        self._clock = clock
        self._mtime_ns = time.time_ns()
        self._uid, self._gid = os.getuid(), os.getgid()
        # Memos: plain dicts, written without a lock; two threads may both ask the view, which
        # is harmless since the answers agree (files are immutable).
        self._sizes: dict[bytes, int] = {}
        self._jobs: tuple[float, list[bytes]] | None = None
        self._trees: dict[bytes, tuple[float, dict[str, Any] | None]] = {}
        self._handles: dict[int, tuple[bytes, int]] = {}
        self._streams: dict[int, ReadAhead] = {}  # per open handle, as the kernel's f_ra
        self._next_fh = itertools.count(1)
        self._fetchers: dict[bytes, Any] = {}
        if not tuning.zero_copy:
            self.read_buf = None  # mfusepy skips callbacks that resolve to None: libfuse calls read()

    # ---- lookups --------------------------------------------------------------------------------

    def _size(self, fid: bytes) -> int | None:
        size = self._sizes.get(fid)
        if size is not None:
            return size
        size = self._cache.size_of(fid)
        if size is None:
            # An absence is not remembered: a task names a file because the ledger registered it,
            # so "absent" is a lagging master's answer (the view asks twice, 1.2 s apart), and a
            # remembered one failed every retry of a tile task within a second (the chaos soak)
            size = _ask(self._view.size, fid)
            if size is None:
                return None
        _bounded(self._sizes)[fid] = size
        return size

    def _job_list(self) -> list[bytes]:
        now = self._clock()
        if self._jobs is None or now - self._jobs[0] >= self._ttl:
            self._jobs = (now, list(_ask(self._view.jobs)))
        return self._jobs[1]

    def _tree(self, job: bytes) -> dict[str, Any] | None:
        now = self._clock()
        memo = self._trees.get(job)
        if memo is None or now - memo[0] >= self._ttl:
            files = _ask(self._view.job_files, job)
            memo = (now, None if files is None else _job_tree(files))
            _bounded(self._trees)[job] = memo
        return memo[1]

    def _resolve(self, path: str) -> tuple[bytes, int] | dict[str, Any]:
        """A path -> (fid, size) for a file, or a dict of its children for a directory."""
        parts = [p for p in path.split("/") if p]
        if not parts:
            return {"files": {}, "jobs": {}}
        top, rest = parts[0], parts[1:]
        if top == "files":
            if not rest:
                return {fid.hex(): b"" for fid in self._cache.cached_ids()} if self._tuning.enumerate else {}
            fid = _parse_id(rest[0])
            size = None if fid is None or len(rest) > 1 else self._size(fid)
            if size is None:
                raise _fuse_error(errno.ENOENT)
            return fid, size
        if top == "jobs":
            if not rest:
                return {job.hex(): {} for job in self._job_list()} if self._tuning.enumerate else {}
            job = _parse_id(rest[0])
            node: Any = None if job is None else self._tree(job)
            for part in rest[1:]:
                node = node.get(part) if isinstance(node, dict) else None
            if isinstance(node, dict):
                return node
            size = None if node is None else self._size(node)
            if size is None:
                raise _fuse_error(errno.ENOENT)
            return node, size
        raise _fuse_error(errno.ENOENT)

    # ---- mfusepy operations ---------------------------------------------------------------------

    def init_with_config(self, conn: Any, config: Any) -> None:
        """Tune the connection before the kernel's first request (FUSE_INIT)."""
        t = self._tuning
        if conn is not None:
            if t.zero_copy and t.splice:
                # Not SPLICE_MOVE: the kernel would try to steal the pages out of the cache
                # file's page cache (seen in perf as page_cache_pipe_buf_try_steal), so the
                # next direct read of that file would go to disk; it copies them anyway.
                conn.want |= conn.capable & _FUSE_CAP_SPLICE_WRITE
                # The kernel sizes requests from max_write (max_pages). libfuse splices a reply
                # only if it fits its pipe, and an unprivileged pipe tops out at pipe-max-size
                # (1 MiB): a 1 MiB request would fall back to a malloc'd copy every time.
                conn.max_write = min(conn.max_write, _REQUEST_MAX)
            conn.max_readahead = max(conn.max_readahead, t.readahead)
        if config is not None:
            config.negative_timeout = 0.0  # an id missing now may be uploaded a second later
        if self._mountpoint and t.readahead and not t.direct_io:
            _set_readahead(self._mountpoint, t.readahead)

    def getattr(self, path: str, fh: Any = None) -> dict[str, int]:
        """stat(2) of a path: directories 0o555, files 0o444 with their size."""
        node = self._resolve(path)
        attrs = {
            "st_uid": self._uid,
            "st_gid": self._gid,
            "st_atime": self._mtime_ns,
            "st_mtime": self._mtime_ns,
            "st_ctime": self._mtime_ns,
        }
        if isinstance(node, dict):
            return {**attrs, "st_mode": _DIR_MODE, "st_nlink": 2}
        size = node[1]
        # st_blksize: the block the cache fetches, so cat/cp read whole blocks per call.
        return {**attrs, "st_mode": _FILE_MODE, "st_nlink": 1, "st_size": size,
                "st_blocks": (size + 511) // 512, "st_blksize": BLOCK}

    def readdir(self, path: str, fh: Any) -> list[str]:
        """The names in a directory."""
        node = self._resolve(path)
        if not isinstance(node, dict):
            raise _fuse_error(errno.ENOTDIR)
        return [".", "..", *node]

    def open(self, path: str, fi: Any) -> int:
        """Open read-only, pin the file in the cache, let the kernel keep its pages."""
        if fi.flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise _fuse_error(errno.EROFS)
        node = self._resolve(path)
        if isinstance(node, dict):
            raise _fuse_error(errno.EISDIR)
        fid, size = node
        self._cache.pin(fid)
        fh = next(self._next_fh)
        self._handles[fh] = node
        if self._tuning.cache_read_ahead > 0:
            self._streams[fh] = ReadAhead(self._tuning.cache_read_ahead)
        fi.fh = fh
        fi.keep_cache = 1  # immutable: pages cached by an earlier open are still right
        fi.direct_io = int(self._tuning.direct_io)
        return 0

    def release(self, path: str, fi: Any) -> int:
        """Close: unpin the file."""
        node = self._handles.pop(fi.fh, None)
        self._streams.pop(fi.fh, None)
        if node is not None:
            self._cache.unpin(node[0])
        return 0

    def _prepare(self, fi: Any, size: int, offset: int) -> tuple[int, int]:
        fid, fsize = self._handles[fi.fh]
        fetch = self._fetchers.get(fid)
        if fetch is None:
            fetch = _bounded(self._fetchers)[fid] = functools.partial(self._view.read, fid)
        stream = self._streams.get(fi.fh)
        if stream is not None and not self._cache.is_complete(fid):
            # Before the read's own fetch, so that the window's fetches overlap it.
            ahead = stream.advise(offset, size)
            if ahead is not None:
                self._cache.prefetch(fid, ahead[0], ahead[1], fetch)
        try:
            return self._cache.prepare(fid, offset, size, fsize, fetch)
        except Exception as e:
            log.warning("fuse: read of %s at %d+%d failed: %s", fid.hex(), offset, size, e)
            raise _fuse_error(errno.EIO) from e

    def read_buf(self, path: str, bufpp: Any, size: int, offset: int, fi: Any) -> int:
        """Reply with an fd buffer over the cache file: libfuse copies (or splices) it in C."""
        fd, n = self._prepare(fi, size, offset)
        addr = _libc.calloc(1, _BUFVEC_ALLOC)
        if not addr:
            raise _fuse_error(errno.ENOMEM)
        vec = _FuseBufvec.from_address(addr)
        vec.count = 1
        vec.buf.size = n
        vec.buf.flags = _FD_FLAGS
        vec.buf.fd = fd
        vec.buf.pos = offset
        ctypes.cast(bufpp, ctypes.POINTER(ctypes.c_void_p))[0] = addr
        return 0

    def read(self, path: str, size: int, offset: int, fi: Any) -> bytes:
        """The bytes variant of read_buf (used when zero_copy is off)."""
        fd, n = self._prepare(fi, size, offset)
        return os.pread(fd, n, offset) if n else b""

    def statfs(self, path: str) -> dict[str, int]:
        """Sizes for df: the cache's capacity and use, in blocks of BLOCK bytes."""
        s = self._cache.stats()
        return {"f_bsize": BLOCK, "f_frsize": BLOCK, "f_blocks": s["capacity_bytes"] // BLOCK,
                "f_bfree": 0, "f_bavail": 0, "f_namemax": 255}

    def _refuse(self, *args: Any) -> int:
        raise _fuse_error(errno.EROFS)

    # Registered (not left to libfuse's ENOSYS) so that a writer gets EROFS even without -o ro.
    create = write = truncate = unlink = mkdir = rmdir = rename = symlink = link = _refuse
    chmod = chown = utimens = mknod = setxattr = removexattr = _refuse


def _ask(call: Any, *args: Any) -> Any:
    """A view query; its failure becomes one log line and EIO for the caller."""
    try:
        return call(*args)
    except Exception as e:
        log.warning("fuse: storage view %s%s failed: %s", getattr(call, "__name__", call),
                    tuple(a.hex() if isinstance(a, bytes) else a for a in args), e)
        raise _fuse_error(errno.EIO) from e


def _bounded(memo: dict) -> dict:
    if len(memo) >= _MEMO_LIMIT:
        memo.clear()  # crude, but a memo that only ever grows is a leak
    return memo


# ---- mounting -----------------------------------------------------------------------------------

def fuse_available() -> tuple[bool, str]:
    """Whether this process can mount: (True, "") or (False, why not)."""
    if not os.path.exists("/dev/fuse"):
        return False, "/dev/fuse does not exist"
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC))
    except OSError as e:
        return False, f"/dev/fuse cannot be opened: {e}"
    if mfusepy is None:
        return False, _IMPORT_ERROR
    if mfusepy.fuse_version_major != 3:
        return False, f"mfusepy loaded libfuse {mfusepy.fuse_version_major}, not libfuse3"
    if shutil.which("fusermount3") is None:
        return False, "fusermount3 is not installed"
    return True, ""


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as \\ooo octal."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _mount_device(mountpoint: str) -> str | None:
    """The "major:minor" of the filesystem mounted at ``mountpoint`` (the newest), or None."""
    target = os.path.abspath(mountpoint)
    device = None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                fields = line.split()
                if len(fields) > 4 and _unescape(fields[4]) == target:
                    device = fields[2]
    except OSError:
        return None
    return device


def unmount(mountpoint: str | os.PathLike, *, lazy: bool = False) -> None:
    """Unmount a FUSE mount (``fusermount3 -u``, ``-z`` if lazy); raises OSError on failure."""
    path = os.path.abspath(os.fspath(mountpoint))
    cmd = ["fusermount3", "-u", *(["-z"] if lazy else []), path]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode == 0 or _mount_device(path) is None:
        return
    if os.geteuid() == 0:  # fusermount3 refuses mounts it does not know from /etc/mtab
        done = subprocess.run(["umount", *(["-l"] if lazy else []), path], capture_output=True, text=True)
        if done.returncode == 0:
            return
    raise OSError(errno.EBUSY, f"cannot unmount {path}: {done.stderr.strip()}")


def end_with(pid: int, mountpoint: str | os.PathLike) -> threading.Thread:
    """Unmount ``mountpoint`` and end this process when process ``pid`` (a worker, this mount's
    parent) exits, however it exits: a mount must not outlive its worker.

    Why a watch on a pidfd and not PR_SET_PDEATHSIG: the death signal needs a ``preexec_fn`` in the
    worker, which is unsafe in a threaded process, and it fires when the *thread* that forked
    exits, not the worker; nor can the worker clean up after a SIGKILL. A pidfd becomes readable
    when the process exits (an event, no polling), whoever its parent is. Then a lazy unmount
    (tasks may still hold files open) ends the FUSE loop, and SIGTERM covers a loop not yet
    started. If ``pid`` is gone already, or is not our parent any more (it died and we were
    reparented), this process ends at once."""
    path = os.path.abspath(os.fspath(mountpoint))
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        fd = None
    if fd is None or os.getppid() != pid:
        log.warning("fuse: process %d, whose mount this is, is gone: not mounting %s", pid, path)
        raise SystemExit(1)

    def watch() -> None:
        select.select([fd], [], [])  # readable once the process exited
        log.warning("fuse: process %d, whose mount this is, exited: unmounting %s", pid, path)
        try:
            unmount(path, lazy=True)
        except OSError as exc:
            log.warning("fuse: unmount of %s: %s", path, exc)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=watch, name=f"end-with-{pid}", daemon=True)
    thread.start()
    return thread


def clear_stale_mount(mountpoint: str | os.PathLike) -> bool:
    """Detach a dead mount left by a killed server ("Transport endpoint is not connected").

    Returns True if one was cleared; raises RuntimeError if a live filesystem is mounted there.
    """
    path = os.fspath(mountpoint)
    try:
        # statfs always reaches the server; a stat of the root may be answered from the
        # kernel's attribute cache for a second after the server died.
        os.statvfs(path)
    except FileNotFoundError:
        return False
    except OSError as e:
        if e.errno != errno.ENOTCONN:
            raise
        log.warning("fuse: clearing the stale mount at %s", path)
        unmount(path, lazy=True)
        return True
    if os.path.ismount(path):
        raise RuntimeError(f"{path} is already a live mount point")
    return False


def _set_readahead(mountpoint: str, nbytes: int) -> bool:
    """Raise the mount's readahead (its bdi's read_ahead_kb); root only, best effort.

    The kernel starts a FUSE mount at 128 KiB and only lowers it from FUSE_INIT, so 128 KiB
    reads by a program mean 128 KiB requests; a larger window lets one request carry ~1 MiB.
    Runs inside FUSE_INIT, when the mount is in mountinfo but nothing on it may be stat'ed yet.
    """
    device = _mount_device(mountpoint)
    if device is None:
        return False
    try:
        with open(f"/sys/class/bdi/{device}/read_ahead_kb", "w", encoding="ascii") as fh:
            fh.write(str(nbytes // 1024))
    except OSError as e:
        log.debug("fuse: readahead of %s left at the default: %s", mountpoint, e)
        return False
    return True


def mount(
    view: StorageView,
    cache: BlockCache,
    mountpoint: str | os.PathLike,
    *,
    foreground: bool = True,
    threads: bool = True,
    allow_other: bool = False,
    tuning: Tuning = Tuning(),
) -> None:
    """Serve ``StorageFS(view, cache)`` read-only at ``mountpoint`` until it is unmounted.

    Clears a dead mount left there by a killed predecessor first. Blocks until ``unmount()``
    or a SIGTERM/SIGINT/SIGHUP (libfuse's handlers, installed when this runs in the main
    thread, end the loop and unmount). ``foreground=False`` lets libfuse daemonize: the calling
    process exits and a forked child serves. ``threads=False`` serves one request at a time.
    ``allow_other`` lets users other than the mounting one read (needs user_allow_other in
    /etc/fuse.conf unless root). libfuse chdir()s the process to / even in the foreground.
    """
    ok, why = fuse_available()
    if not ok:
        raise OSError(errno.ENODEV, f"FUSE is unavailable: {why}")
    path = os.path.abspath(os.fspath(mountpoint))
    clear_stale_mount(path)
    Path(path).mkdir(parents=True, exist_ok=True)
    fs = StorageFS(view, cache, tuning=tuning, mountpoint=path)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)  # libfuse installs its own only over SIG_DFL
    options: dict[str, Any] = {
        "foreground": foreground,
        "nothreads": not threads,
        "ro": True,
        "default_permissions": True,
        "fsname": "cluster-storage",
        "subtype": "cluster",
    }
    if allow_other:
        options["allow_other"] = True
    log.info("fuse: mounting the storage view at %s (%s, %s)", path,
             "threaded" if threads else "single-threaded", tuning)
    try:
        mfusepy.FUSE(fs, path, raw_fi=True, **options)
    except RuntimeError as e:
        # libfuse 3.14's fuse_main returns 7 (single-threaded) or 8 (threaded) whenever its loop
        # ends with an error set, and a SIGTERM sets one: that is the normal way to stop.
        if e.args not in ((7,), (8,)):
            raise
        log.info("fuse: %s unmounted (the loop ended on a signal)", path)
    else:
        log.info("fuse: %s unmounted", path)
