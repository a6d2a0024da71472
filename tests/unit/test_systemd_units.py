"""deploy/systemd/*.service: the host hardening of issue 20, checked for meaning.

Each unit is parsed twice: with configparser (strict=False, so systemd's repeated keys do not stop
it; it must agree with our parser on each key's last value) and with a small parser that keeps
every assignment in order, as systemd reads them (SystemCallFilter=, ReadOnlyPaths= and the like
accumulate, an empty assignment resets). ``problems()`` says what a unit lacks for its role;
each unit must have none, and taking any one hardening line out of a unit must give one, so a
directive removed (or a unit added without its checks) fails here. When systemd-analyze is on
PATH, ``systemd-analyze verify`` must not call any directive unknown or unparsable.
"""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[2] / "deploy" / "systemd"
FILES = {
    "master": "cluster-master@.service",
    "balancer": "cluster-balancer@.service",
    "storage": "cluster-storage@.service",
    "worker": "cluster-worker.service",
    "mount": "cluster-mount.service",
}
STRICT = ("master", "balancer", "storage")  # no capability, no privilege change, no device
NODES = STRICT + ("worker",)  # the node launchers (reload on SIGHUP, data directories)

TRUE = {"yes", "true", "on", "1"}
# Settings systemd implements with seccomp: for a unit whose User= lacks CAP_SYS_ADMIN, any of
# them turns NoNewPrivileges=yes on (systemd.exec(5); context_has_no_new_privileges()), which
# would stop the setuid fusermount3 from mounting.
IMPLY_NNP = ("LockPersonality", "MemoryDenyWriteExecute", "PrivateDevices", "ProtectClock", "ProtectHostname",
             "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs", "RestrictAddressFamilies",
             "RestrictNamespaces", "RestrictRealtime", "RestrictSUIDSGID", "SystemCallArchitectures",
             "SystemCallFilter", "SystemCallLog", "NoNewPrivileges", "DynamicUser")
# Settings that give a unit its own mount namespace: a mount made inside it never reaches the host.
OWN_MOUNT_NAMESPACE = ("ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "PrivateMounts", "PrivateIPC",
                       "ReadOnlyPaths", "ReadWritePaths", "InaccessiblePaths", "ExecPaths", "NoExecPaths",
                       "TemporaryFileSystem", "BindPaths", "BindReadOnlyPaths", "ProtectKernelTunables",
                       "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups", "ProtectProc",
                       "ProcSubset", "MountAPIVFS", "RootDirectory", "RootImage", "MountFlags")
# Lines that are operation, not hardening: taking one out need not be noticed here.
NOT_HARDENING = {"Type", "KillSignal", "KillMode", "TimeoutStopSec", "Restart", "RestartSec", "ExecStopPost"}


# ---- parsing ------------------------------------------------------------------------------------

class Unit:
    """A unit file's assignments, in order, per section."""

    def __init__(self, name: str, text: str) -> None:
        self.name = name
        self.text = text
        self.sections: dict[str, list[tuple[str, str]]] = {}
        section = None
        pending = ""
        for raw in text.splitlines():
            line = pending + raw.strip() if pending else raw.strip()
            pending = ""
            if not line or line[0] in "#;":
                continue
            if line.endswith("\\"):  # systemd's line continuation
                pending = line[:-1] + " "
                continue
            if line.startswith("[") and line.endswith("]"):
                section = line[1:-1]
                self.sections.setdefault(section, [])
                continue
            assert section is not None, f"{name}: assignment before any section: {line!r}"
            key, sep, value = line.partition("=")
            assert sep, f"{name}: not an assignment: {line!r}"
            self.sections[section].append((key.strip(), value.strip()))

    def all(self, key: str, section: str = "Service") -> list[str]:
        return [v for k, v in self.sections.get(section, []) if k == key]

    def last(self, key: str, section: str = "Service") -> str | None:
        values = self.all(key, section)
        return values[-1] if values else None

    def items(self, key: str, section: str = "Service") -> list[str]:
        """A list setting as systemd merges it: assignments add up, an empty one resets."""
        out: list[str] = []
        for value in self.all(key, section):
            out = [] if value == "" else out + shlex.split(value)
        return out

    def on(self, key: str) -> bool:
        """Whether a setting is in effect (a true boolean, or a non-empty value that is not "no")."""
        value = self.last(key)
        return value is not None and value != "" and value.lower() not in {"no", "false", "off", "0"}

    def without(self, index: int) -> "Unit":
        """This unit with its index-th [Service] assignment taken out."""
        lines = self.text.splitlines()
        seen = -1
        in_service = False
        for i, raw in enumerate(lines):
            s = raw.strip()
            if s.startswith("[") and s.endswith("]"):
                in_service = s == "[Service]"
                continue
            if in_service and s and s[0] not in "#;" and "=" in s:
                seen += 1
                if seen == index:
                    return Unit(self.name, "\n".join(lines[:i] + lines[i + 1:]) + "\n")
        raise IndexError(index)


def load(role: str) -> Unit:
    return Unit(FILES[role], (UNITS / FILES[role]).read_text())


def exec_args(unit: Unit, key: str = "ExecStart") -> list[str]:
    value = unit.last(key) or ""
    return shlex.split(value.lstrip("@-:+!"))


def option(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


# ---- what each role must have -------------------------------------------------------------------

def _expect(unit: Unit, key: str, want: str, out: list[str]) -> None:
    got = unit.last(key)
    if got is None or got.lower() != want.lower():
        out.append(f"{key}={want} (has {got!r})")


def _expect_on(unit: Unit, key: str, out: list[str]) -> None:
    got = unit.last(key)
    if got is None or got.lower() not in TRUE:
        out.append(f"{key}=yes (has {got!r})")


def common_problems(unit: Unit) -> list[str]:
    out: list[str] = []
    if unit.last("User") != "cluster":
        out.append(f"User=cluster (has {unit.last('User')!r}): no unit runs as root")
    if unit.last("Group") != "cluster":
        out.append(f"Group=cluster (has {unit.last('Group')!r})")
    _expect(unit, "UMask", "0077", out)
    _expect(unit, "RemoveIPC", "yes", out)
    if "Leaves out" not in unit.text:
        out.append("a comment saying what the unit leaves out and why")
    return out


def node_problems(role: str, unit: Unit) -> list[str]:
    """What every node launcher (master, balancer, storage, worker) needs."""
    out: list[str] = []
    argv = exec_args(unit)
    if unit.last("ExecReload") != "/bin/kill -HUP $MAINPID":
        out.append("ExecReload=/bin/kill -HUP $MAINPID (SIGHUP re-reads the allow-list)")
    _expect(unit, "ProtectSystem", "strict", out)
    for key in ("ProtectHome", "PrivateTmp", "PrivateMounts", "ProtectControlGroups"):
        _expect_on(unit, key, out)
    if "/etc/cluster" not in unit.items("ReadOnlyPaths"):
        out.append("ReadOnlyPaths=/etc/cluster")
    # Of the keys, only this node's own secret: an empty read-only tmpfs with that one file bound in.
    if unit.items("TemporaryFileSystem") != ["/etc/cluster/keys:ro"]:
        out.append("TemporaryFileSystem=/etc/cluster/keys:ro")
    name = option(argv, "--name")
    if unit.items("BindReadOnlyPaths") != [f"-/etc/cluster/keys/{name}.key_secret"]:
        out.append(f"BindReadOnlyPaths=-/etc/cluster/keys/{name}.key_secret (its own key, --name {name})")
    # The Raft secret is the masters' alone.
    hidden = "-/etc/cluster/raft.secret" in unit.items("InaccessiblePaths")
    if hidden == (role == "master"):
        out.append("InaccessiblePaths=-/etc/cluster/raft.secret " + ("must not hide it from a master" if hidden
                                                                     else "(only masters read it)"))
    # The data directory must be writable: under a StateDirectory, private to the unit.
    data_dir = option(argv, "--data-dir")
    states = [f"/var/lib/{d}" for d in unit.items("StateDirectory")]
    if data_dir is not None:
        if not any(data_dir == s or data_dir.startswith(s + "/") for s in states):
            out.append(f"StateDirectory covering --data-dir {data_dir} (has {states})")
        # 0711 for the worker: its tasks (another user) pass through to their own directories
        _expect(unit, "StateDirectoryMode", "0711" if "--task-user" in argv else "0700", out)
    elif states:
        out.append(f"no StateDirectory for a node without --data-dir (has {states})")
    return out


def strict_problems(unit: Unit) -> list[str]:
    """Masters, balancers, storage nodes: the strictest set."""
    out: list[str] = []
    for key in ("NoNewPrivileges", "PrivateDevices", "ProtectKernelTunables", "ProtectKernelModules",
                "ProtectKernelLogs", "ProtectClock", "ProtectHostname", "RestrictNamespaces", "RestrictRealtime",
                "RestrictSUIDSGID", "LockPersonality", "MemoryDenyWriteExecute"):
        _expect_on(unit, key, out)
    _expect(unit, "ProtectProc", "invisible", out)
    if unit.all("CapabilityBoundingSet") == [] or unit.items("CapabilityBoundingSet"):
        out.append(f"CapabilityBoundingSet= empty (has {unit.items('CapabilityBoundingSet')})")
    if unit.all("AmbientCapabilities") != [""]:
        out.append(f"AmbientCapabilities= (empty) (has {unit.all('AmbientCapabilities')})")
    # AF_NETLINK: libzmq resolves a bind address with getifaddrs() first and aborts if that fails.
    families = unit.items("RestrictAddressFamilies")
    if sorted(families) != sorted(["AF_INET", "AF_INET6", "AF_UNIX", "AF_NETLINK"]):
        out.append(f"RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX AF_NETLINK (has {families})")
    _expect(unit, "SystemCallArchitectures", "native", out)
    filters = unit.all("SystemCallFilter")
    if not filters or filters[0] != "@system-service":
        out.append(f"SystemCallFilter=@system-service first (has {filters})")
    denied = [g for f in filters if f.startswith("~") for g in f[1:].split()]
    if "@privileged" not in denied:
        out.append("SystemCallFilter=~@privileged")
    # libzmq's I/O threads call pthread_setschedparam (sched_setscheduler, in @resources) and abort
    # when it fails: denying @resources stops every node at its first socket.
    if "@resources" in denied:
        out.append("not SystemCallFilter=~@resources (libzmq aborts without sched_setscheduler)")
    _expect(unit, "SystemCallErrorNumber", "EPERM", out)
    return out


def worker_problems(unit: Unit) -> list[str]:
    out: list[str] = []
    on = [k for k in IMPLY_NNP if unit.on(k)]
    if on:
        out.append(f"none of {on}: each implies NoNewPrivileges, and fusermount3 must run setuid")
    if unit.on("PrivateUsers"):
        out.append("no PrivateUsers: fusermount3 and the switch to cluster-task need the host's uids")
    ambient = unit.items("AmbientCapabilities")
    if sorted(ambient) != ["CAP_KILL", "CAP_SETGID", "CAP_SETUID"]:
        out.append(f"AmbientCapabilities=CAP_SETUID CAP_SETGID CAP_KILL exactly (has {ambient})")
    bounding = unit.items("CapabilityBoundingSet")
    if sorted(bounding) != ["CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SYS_ADMIN"]:
        out.append(f"CapabilityBoundingSet=CAP_SETUID CAP_SETGID CAP_KILL CAP_SYS_ADMIN exactly (has {bounding}): "
                   "the ambient ones, and what the setuid fusermount3 gets for mount(2)")
    # tasks run as cluster-task, sharing files with the worker through that group
    if option(exec_args(unit), "--task-user") != "cluster-task":
        out.append("ExecStart with --task-user cluster-task (tasks must not run as the worker's user)")
    if unit.items("SupplementaryGroups") != ["cluster-task"]:
        out.append(f"SupplementaryGroups=cluster-task (has {unit.items('SupplementaryGroups')})")
    _expect(unit, "DevicePolicy", "closed", out)
    if unit.items("DeviceAllow") != ["/dev/fuse", "rw"]:
        out.append(f"DeviceAllow=/dev/fuse rw (has {unit.all('DeviceAllow')})")
    # ProtectKernelTunables' file part, without the seccomp part that would imply NoNewPrivileges.
    read_only = unit.items("ReadOnlyPaths")
    for path in ("/proc/sys", "/sys", "-/proc/sysrq-trigger"):
        if path not in read_only:
            out.append(f"ReadOnlyPaths={path} (CAP_SETUID can take uid 0)")
    hidden = unit.items("InaccessiblePaths")
    for path in ("-/etc/shadow", "-/etc/gshadow", "-/proc/kcore", "-/etc/ssh/ssh_host_ed25519_key"):
        if path not in hidden:
            out.append(f"InaccessiblePaths={path}")
    # numba and the kernel builds cache where the worker may write.
    env = dict(item.split("=", 1) for item in unit.items("Environment"))
    caches = [f"/var/cache/{d}" for d in unit.items("CacheDirectory")]
    for var in ("NUMBA_CACHE_DIR", "CLUSTER_SW_CACHE"):
        if not any(env.get(var, "").startswith(c + "/") for c in caches):
            out.append(f"Environment={var}= under a CacheDirectory (has {env.get(var)!r}, caches {caches})")
    _expect(unit, "CacheDirectoryMode", "0700", out)
    return out


def mount_problems(unit: Unit) -> list[str]:
    out: list[str] = []
    on = [k for k in IMPLY_NNP if unit.on(k)]
    if on:
        out.append(f"none of {on}: each implies NoNewPrivileges, and fusermount3 must run setuid")
    own = [k for k in OWN_MOUNT_NAMESPACE if unit.all(k)]
    if own:
        out.append(f"none of {own}: the mount must reach the host's mount namespace")
    if unit.on("PrivateUsers"):
        out.append("no PrivateUsers")
    bounding = unit.items("CapabilityBoundingSet")
    if bounding != ["CAP_SYS_ADMIN"]:
        out.append(f"CapabilityBoundingSet=CAP_SYS_ADMIN exactly (has {bounding}): all the setuid fusermount3 needs")
    if unit.all("AmbientCapabilities") != [""]:
        out.append(f"AmbientCapabilities= (empty) (has {unit.all('AmbientCapabilities')})")
    if unit.all("ExecReload"):
        out.append("no ExecReload: SIGHUP ends libfuse's loop, i.e. unmounts")
    _expect(unit, "DevicePolicy", "closed", out)
    if unit.items("DeviceAllow") != ["/dev/fuse", "rw"]:
        out.append(f"DeviceAllow=/dev/fuse rw (has {unit.all('DeviceAllow')})")
    argv = exec_args(unit)
    if argv[1:3] != ["mount", "/mnt/cluster"]:
        out.append(f"ExecStart mounts /mnt/cluster (has {argv[:3]})")
    if "--allow-other" not in argv:
        out.append("--allow-other (with user_allow_other in /etc/fuse.conf)")
    if option(argv, "--key") != "/etc/cluster/keys/%H.key_secret":
        out.append("--key /etc/cluster/keys/%H.key_secret")
    if unit.items("CacheDirectory") != ["cluster"] or option(argv, "--cache") != "/var/cache/cluster":
        out.append("CacheDirectory=cluster and --cache /var/cache/cluster")
    _expect(unit, "CacheDirectoryMode", "0700", out)
    # The mountpoint: made as root (the "+" step alone), owned by cluster, so fusermount3 mounts there.
    pre = unit.all("ExecStartPre")
    made = [p for p in pre if p.startswith("+")
            and shlex.split(p[1:])[:1] == ["/bin/install"] and shlex.split(p[1:])[-1] == "/mnt/cluster"]
    if not made:
        out.append("ExecStartPre=+/bin/install -d -o cluster -g cluster ... /mnt/cluster")
    else:
        args = shlex.split(made[0][1:])
        if option(args, "-o") != "cluster" or option(args, "-g") != "cluster" or "-d" not in args:
            out.append(f"the mountpoint owned by cluster (has {made[0]!r})")
    if any(p.startswith("+") and not p.startswith("+/bin/install ") for p in pre):
        out.append("no other privileged ('+') step")
    # A dead mount left by a crash makes install fail: it is detached first (as cluster).
    clear = [i for i, p in enumerate(pre) if p.startswith("-/bin/fusermount3 -u")]
    if not clear or (made and clear[0] > pre.index(made[0])):
        out.append("ExecStartPre=-/bin/fusermount3 -u -z -q /mnt/cluster before the install")
    if not any("fusermount3 -u" in p for p in unit.all("ExecStopPost")):
        out.append("ExecStopPost=-/bin/fusermount3 -u -z /mnt/cluster")
    return out


def problems(role: str, unit: Unit) -> list[str]:
    out = common_problems(unit)
    if role in NODES:
        out += node_problems(role, unit)
    if role in STRICT:
        out += strict_problems(unit)
    elif role == "worker":
        out += worker_problems(unit)
    elif role == "mount":
        out += mount_problems(unit)
    return out


# ---- tests --------------------------------------------------------------------------------------

def test_every_unit_is_checked():
    assert sorted(p.name for p in UNITS.glob("*.service")) == sorted(FILES.values())


@pytest.mark.parametrize("role", FILES)
def test_configparser_reads_the_unit_as_we_do(role):
    unit = load(role)
    parser = configparser.ConfigParser(strict=False, interpolation=None, comment_prefixes=("#", ";"),
                                       delimiters=("=",), empty_lines_in_values=False)
    parser.optionxform = str  # systemd's keys are case-sensitive
    parser.read_string(unit.text)
    assert set(parser.sections()) == set(unit.sections) >= {"Unit", "Service", "Install"}
    for section, pairs in unit.sections.items():
        assert set(parser[section]) == {k for k, _ in pairs}
        for key in parser[section]:
            assert parser[section][key] == unit.last(key, section), (section, key)  # the last one wins


@pytest.mark.parametrize("role", FILES)
def test_unit_has_the_hardening_of_its_role(role):
    assert problems(role, load(role)) == []


@pytest.mark.parametrize("role", FILES)
def test_taking_out_any_hardening_line_is_noticed(role):
    unit = load(role)
    service = unit.sections["Service"]
    checked = 0
    for index, (key, value) in enumerate(service):
        if key in NOT_HARDENING:
            continue
        checked += 1
        assert problems(role, unit.without(index)), f"{FILES[role]}: nothing notices {key}={value} taken out"
    assert checked >= 10


def test_the_roles_differ_where_they_must():
    worker, mount, master = load("worker"), load("mount"), load("master")
    # The worker and the mount run fusermount3 setuid: no NoNewPrivileges, stated or implied.
    for unit in (worker, mount):
        assert not unit.on("NoNewPrivileges") and not unit.on("RestrictSUIDSGID")
        assert not unit.on("MemoryDenyWriteExecute")
    # The worker runs numba; nothing denies it writable+executable memory.
    assert not worker.on("MemoryDenyWriteExecute")
    assert "CAP_SYS_ADMIN" not in worker.items("AmbientCapabilities")
    # A strict unit with any capability, or a worker without CAP_SYS_ADMIN in reach of fusermount3,
    # is a regression.
    assert master.items("CapabilityBoundingSet") == []
    assert "CAP_SYS_ADMIN" in worker.items("CapabilityBoundingSet")
    assert set(worker.items("AmbientCapabilities")) <= set(worker.items("CapabilityBoundingSet"))


def test_the_checks_catch_a_unit_running_as_root_or_with_nnp_on_the_worker():
    worker = load("worker")
    root = Unit(worker.name, worker.text.replace("User=cluster", "User=root"))
    assert any("User=cluster" in p for p in problems("worker", root))
    nnp = Unit(worker.name, worker.text.replace("RemoveIPC=yes", "RemoveIPC=yes\nLockPersonality=yes"))
    assert any("NoNewPrivileges" in p for p in problems("worker", nnp))
    mount = load("mount")
    ns = Unit(mount.name, mount.text.replace("RemoveIPC=yes", "RemoveIPC=yes\nPrivateTmp=yes"))
    assert any("mount namespace" in p for p in problems("mount", ns))
    strict = load("storage")
    resources = Unit(strict.name, strict.text.replace("~@privileged", "~@privileged @resources"))
    assert any("@resources" in p for p in problems("storage", resources))


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("role", FILES)
def test_systemd_analyze_knows_every_directive(role):
    done = subprocess.run(["systemd-analyze", "verify", str(UNITS / FILES[role])], capture_output=True,
                          text=True, timeout=60)
    complaints = [line for line in (done.stdout + done.stderr).splitlines()
                  if re.search(r"Unknown|Failed to parse|[Ii]gnoring|Invalid|not valid", line)]
    assert complaints == []
