"""Keys: who may speak to the cluster's ZeroMQ ports, and as what.

Theory of operation
-------------------
Every node, client and operator holds a long-term CURVE keypair. Secrets are ZeroMQ certificate
files (pyzmq's ``zmq.auth`` format, ``<name>.key_secret``, mode 600) in a secrets directory.
The **allow-list** (``keys.toml``) names every public key the cluster admits and its role::

    [keys.m1]
    role = "master"
    public = "Yne@$w-vo<fVvi]a<NY6T1ed:M$fCG*[IaLV{hID"

It holds no secret, so one copy goes to every machine (the cluster config points at it). The
name of a node's entry is the node's name in the config: that is how a client finds the public
key of the master at ``tcp://10.0.0.1:5550`` before it connects (CURVE authenticates the server
to the client as well as the client to the server).

A server socket admits a connection only if ZAP (ZeroMQ's authentication protocol, served by
pyzmq's authenticator thread) finds the client's key in the allow-list; the admitted key then
travels with every message it sends (ZAP's User-Id), and the node loop looks it up again in the
*live* list for each message. So a revoked key stops on its next message, not at its next
connect. The list is re-read on SIGHUP (``cluster keys`` sends it to a local cluster's nodes).

SIGHUP and a file, not the ledger: the masters need the list to admit anyone, including the
balancer and storage nodes that would carry it, and a ledger that cannot be reached (no quorum)
must not lock every node out. A file an operator copies and a signal are what sshd and
HTTP servers do; ``cluster keys`` writes the file atomically.

``insecure = true`` in ``[security]`` turns all of this off (plaintext, every peer admitted
with every role); every node warns at start.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import zmq
import zmq.auth

from cluster.node.events import ANYONE, Peer

if TYPE_CHECKING:
    from cluster.node.config import SecurityOptions

log = logging.getLogger("cluster.keys")

ROLES = ("master", "balancer", "storage", "worker", "client", "operator", "monitor", "gateway")
ZAP_DOMAIN = "cluster"
KEY_LENGTH = 40  # a Z85 CURVE key


class KeysError(ValueError):
    """A key file or the allow-list is wrong or missing; the message says what to do."""


@dataclass(frozen=True)
class KeyEntry:
    """One admitted key: its holder's ``name``, ``role`` and ``public`` key (Z85)."""

    name: str
    role: str
    public: str

    @functools.cached_property
    def peer(self) -> Peer:  # made once: the loop asks for it on every message
        return Peer(self.name, self.role)


class AllowList:
    """The admitted keys, by name and by public key. ``load`` re-reads the file in place."""

    def __init__(self, entries: list[KeyEntry] = (), path: Path | None = None) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._lock = threading.Lock()
        self._set(list(entries))

    def _set(self, entries: list[KeyEntry]) -> None:
        by_name: dict[str, KeyEntry] = {}
        by_public: dict[bytes, KeyEntry] = {}
        for e in entries:
            if e.name in by_name:
                raise KeysError(f"{self.path}: {e.name} is listed twice")
            if e.public.encode() in by_public:
                raise KeysError(f"{self.path}: {e.name} has the same public key as {by_public[e.public.encode()].name}")
            by_name[e.name] = e
            by_public[e.public.encode()] = e
        # Replaced whole, never mutated: readers on other threads (ZAP) see one list or the other.
        self.by_name, self.by_public = by_name, by_public

    @classmethod
    def read(cls, path: Path) -> "AllowList":
        allow = cls(path=Path(path))
        allow.reload()
        return allow

    def reload(self) -> int:
        """Re-read the file; returns the number of keys. On error the old list stays."""
        assert self.path is not None
        with self._lock:
            stamp = _stamp(self.path)
            self._set(parse_allow_list(self.path))
            self._stamp = stamp
        return len(self.by_name)

    def refresh(self) -> bool:
        """Reload if the file changed since it was read (a stat: cheap enough to do every
        second, and on every unknown key). True if it was reloaded."""
        if self.path is None or _stamp(self.path) == self._stamp:
            return False
        self.reload()
        return True

    def admit(self, public_z85: bytes) -> KeyEntry | None:
        return self.by_public.get(public_z85)

    def __iter__(self) -> Iterator[KeyEntry]:
        return iter(sorted(self.by_name.values(), key=_by_role))

    def __len__(self) -> int:
        return len(self.by_name)


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_ino


def parse_allow_list(path: Path) -> list[KeyEntry]:
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise KeysError(f"{path}: no allow-list; make one with `cluster keys init DIR` "
                        "(or set [security] insecure = true to run in plaintext)") from None
    except tomllib.TOMLDecodeError as exc:
        raise KeysError(f"{path}: not valid TOML: {exc}") from None
    keys = data.get("keys") or {}
    if not isinstance(keys, dict):
        raise KeysError(f"{path}: needs [keys.<name>] tables")
    out = []
    for name, entry in keys.items():
        if "/" in name:  # GATEWAY/user names a gateway's user (cluster.node.acting): never a key
            raise KeysError(f"{path}: [keys.{name}] a key's name may not contain '/'")
        if not isinstance(entry, dict) or entry.get("role") not in ROLES:
            raise KeysError(f"{path}: [keys.{name}] needs role = one of {', '.join(ROLES)}")
        public = entry.get("public")
        if not _is_key(public):
            raise KeysError(f"{path}: [keys.{name}] public must be a {KEY_LENGTH}-character Z85 CURVE key")
        out.append(KeyEntry(name, entry["role"], public))
    return out


def write_allow_list(path: Path, entries: list[KeyEntry]) -> None:
    """Write the allow-list atomically (a reader never sees half a file)."""
    lines = ["# The cluster's allow-list: every key admitted and its role. Public keys only: copy it to",
             "# every machine. Written by `cluster keys`; nodes re-read it on SIGHUP.", ""]
    for e in sorted(entries, key=_by_role):
        lines += [f"[keys.{_toml_key(e.name)}]", f'role = "{e.role}"', f'public = "{e.public}"', ""]
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, path)


def _by_role(e: KeyEntry) -> tuple[int, str]:
    """The order keys are listed and written in: nodes first (ROLES' order), then by name."""
    return ROLES.index(e.role), e.name


def _toml_key(name: str) -> str:
    return name if name.replace("-", "").replace("_", "").isalnum() else f'"{name}"'


def _is_key(value: object) -> bool:
    if not isinstance(value, str) or len(value) != KEY_LENGTH:
        return False
    try:
        return len(zmq.utils.z85.decode(value)) == 32
    except (ValueError, KeyError):
        return False


# ---- secret keys ------------------------------------------------------------------------------


def make_secret(directory: Path, name: str) -> str:
    """A fresh keypair for ``name`` in ``directory`` (only its owner can read the secret);
    returns the public key (Z85). An existing key is replaced."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    old = os.umask(0o077)  # pyzmq writes the files with the process's umask
    try:
        _, secret_file = zmq.auth.create_certificates(directory, name)
    finally:
        os.umask(old)
    Path(directory, f"{name}.key").unlink(missing_ok=True)  # the allow-list is the public half
    public, _ = zmq.auth.load_certificate(secret_file)
    return public.decode()


def secret_path(directory: Path, name: str) -> Path:
    return Path(directory) / f"{name}.key_secret"


def load_secret(path: Path) -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys from a secret key file; KeysError says what is wrong."""
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise KeysError(f"{path}: cannot read this key ({exc}); make keys with `cluster keys init DIR` "
                        f"or `cluster keys add NAME --role ROLE`") from None
    if secret is None or not _is_key(secret.decode()):
        raise KeysError(f"{path}: holds no secret key")
    mode = os.stat(path).st_mode & 0o777
    if mode & 0o077:
        log.warning("%s is readable by others (mode %o); chmod 600 it", path, mode)
    return public, secret


# ---- credentials ------------------------------------------------------------------------------


@dataclass
class Credentials:
    """What one process needs to speak CURVE to one cluster: its own keypair, the live
    allow-list, and the servers' public keys by address. ``insecure``: plaintext, no checks."""

    name: str = ""
    public: bytes = b""
    secret: bytes = b""
    allow: AllowList = field(default_factory=AllowList)
    servers: dict[str, bytes] = field(default_factory=dict)  # endpoint -> Z85 public key
    insecure: bool = False
    act_for: str | None = None  # a gateway's user its requests are made for (cluster.node.acting)

    @classmethod
    def plaintext(cls, servers: list[str] = ()) -> "Credentials":
        return cls(insecure=True, servers={a: b"" for a in servers})

    def peer(self, user_id: str | None) -> Peer | None:
        """The admitted holder of the key a message came with, None if not (or no longer) admitted."""
        if self.insecure:
            return ANYONE
        entry = self.allow.admit(user_id.encode()) if user_id else None
        return entry.peer if entry else None

    def server_key(self, address: str, name: str | None = None) -> bytes:
        key = self.servers.get(address)
        if key is None and name is not None and (entry := self.allow.by_name.get(name)):
            key = entry.public.encode()
        if key is None:
            raise KeysError(f"no public key known for {address}: it is not a node of this cluster's config "
                            f"({self.allow.path})")
        return key

    def add_server(self, address: str, name: str) -> None:
        """Pin the key of node ``name`` for ``address`` (a node the config does not list, e.g. a
        worker's status port) and learn it for this process's links."""
        entry = self.allow.by_name.get(name)
        if self.insecure or entry is not None:
            self.servers[address] = b"" if self.insecure else entry.public.encode()
            learn(self)

    def serve(self, sock: zmq.Socket) -> None:
        """Make ``sock`` (about to bind) a CURVE server whose clients ZAP must admit."""
        if self.insecure:
            return
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True
        sock.zap_domain = ZAP_DOMAIN.encode()

    def connect(self, sock: zmq.Socket, address: str, name: str | None = None) -> None:
        """Connect ``sock`` to the server at ``address``, authenticating both ends."""
        if not self.insecure:
            sock.curve_serverkey = self.server_key(address, name)
            sock.curve_secretkey = self.secret
            sock.curve_publickey = self.public
        sock.connect(address)


class Gatekeeper:
    """pyzmq's ZAP credentials provider: admits a connection whose key is in the live
    allow-list; counts (and logs once per key) the ones it refuses."""

    def __init__(self, credentials: Credentials, counters: "dict[str, int]", logger: logging.Logger) -> None:
        self.credentials = credentials
        self.counters = counters
        self.log = logger
        self._lock = threading.Lock()
        self._logged: set[bytes] = set()

    def callback(self, domain: str, key: bytes) -> bool:
        allow = self.credentials.allow
        if allow.admit(key) is not None:
            return True
        try:  # a key added a moment ago: admitted without waiting for the loop's next look
            if allow.refresh() and allow.admit(key) is not None:
                return True
        except KeysError as exc:
            self.log.error("kept the old allow-list: %s", exc)
        with self._lock:
            self.counters["auth_refused"] = self.counters.get("auth_refused", 0) + 1
            if key not in self._logged and len(self._logged) < 1000:
                self._logged.add(key)
                self.log.warning("refused a connection with unknown key %s (not in %s)", key.decode(),
                                 self.credentials.allow.path)
        return False


# ---- the process's known clusters -------------------------------------------------------------

_known: dict[str, Credentials] = {}
_known_lock = threading.Lock()


def learn(credentials: Credentials) -> Credentials:
    """Remember ``credentials`` for every server address it knows: this process's links to those
    addresses (``for_address``) then use them without being told."""
    with _known_lock:
        for address in credentials.servers:
            _known[address] = credentials
    return credentials


def for_address(address: str) -> Credentials:
    """The credentials learnt for ``address``; KeysError when no cluster config named it."""
    creds = _known.get(address)
    if creds is None:
        raise KeysError(f"no keys known for {address}: load its cluster's config first "
                        "(Client(config=...), --config, $CLUSTER_CONFIG)")
    return creds


# ---- loading a process's credentials -----------------------------------------------------------


def node_credentials(security: "SecurityOptions", name: str, role: str | None, servers: dict[str, str]) -> Credentials:
    """The credentials of node ``name`` (whose key must be in the allow-list with ``role``, or any
    role if None: a probe):
    its secret from ``<secrets>/<name>.key_secret``, the live allow-list, and the public key of
    every server in ``servers`` (address -> node name). Learnt for this process's links."""
    if security.insecure:
        return learn(Credentials(name=name, insecure=True, servers={a: b"" for a in servers}))
    return learn(_load(security, secret_path(security.secrets, name), servers, role))


def client_credentials(security: "SecurityOptions", servers: dict[str, str], key_file: Path | str | None = None,
                       *, remember: bool = True) -> Credentials:
    """A client's credentials: its secret from ``key_file``, else ``$CLUSTER_KEY``, else
    ``<secrets>/client.key_secret`` (then ``operator.key_secret``); learnt for this process's
    links unless ``remember`` is false (then pass them explicitly)."""
    remember_ = learn if remember else (lambda c: c)
    if security.insecure:
        return remember_(Credentials(insecure=True, servers={a: b"" for a in servers}))
    key_file = key_file or os.environ.get("CLUSTER_KEY")
    if not key_file:
        candidates = [secret_path(security.secrets, n) for n in ("client", "operator")]
        key_file = next((c for c in candidates if c.exists()), candidates[0])
    return remember_(_load(security, Path(key_file), servers, None))


def _load(security: "SecurityOptions", key_file: Path, servers: dict[str, str], role: str | None) -> Credentials:
    allow = AllowList.read(security.keys)
    public, secret = load_secret(key_file)
    entry = allow.admit(public)
    if entry is None:
        raise KeysError(f"{key_file}: this key is not in the allow-list {security.keys} (revoked or rotated?); "
                        "ask an operator: `cluster keys add NAME --role ROLE`")
    if role is not None and entry.role != role:
        raise KeysError(f"{key_file}: key {entry.name} has role {entry.role} in {security.keys}, not {role}")
    known = {address: allow.by_name[n].public.encode() for address, n in servers.items() if n in allow.by_name}
    return Credentials(entry.name, public, secret, allow, known)


def connect(sock: zmq.Socket, address: str, credentials: Credentials | None = None, name: str | None = None) -> None:
    """Connect ``sock`` to the node at ``address`` with ``credentials`` (default: those learnt
    for that address): CURVE with the server's pinned key, or plaintext for an insecure cluster."""
    (credentials or for_address(address)).connect(sock, address, name)
