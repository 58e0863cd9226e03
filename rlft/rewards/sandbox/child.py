"""The two programs a sandbox runs in its child process, as text (``python -I -S -c``).

The launcher runs first (as the parent's user): it unshares the namespaces the kernel allows,
remounts everything read-only but the sandbox directory, reports what it was granted on the
results pipe, then forks; the child sets the limits, switches uid and execs the harness, which
reads its payload (the code, the tests, a marker) from stdin and reports each test's result on
the results pipe, while the launcher waits, then kills whatever the code left running.

They are strings, not modules: they run in a bare interpreter (no site-packages, no rlft) under
a uid that may not read this package. Left out: starting them and reading what they report
(``runner.py``), and what the level of isolation means for a run (``isolation_level.py``).
"""

LAUNCHER = r'''
import ctypes, json, os, resource, sys
cfg = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
NS, UTS, IPC, USER, PID, NET = 0x20000, 0x4000000, 0x8000000, 0x10000000, 0x20000000, 0x40000000
got = []
work, root = os.getcwd(), os.geteuid() == 0
def mount(src, dst, fs, flags):
    return libc.mount(src and src.encode(), dst.encode(), fs and fs.encode(), flags, None) == 0
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
L = ctypes.c_long
def setattr_(path, flags, set_, clr):  # mount_setattr(AT_FDCWD, path, flags, &attr, sizeof attr)
    attr = (ctypes.c_uint64 * 4)(set_, clr, 0, 0)
    return libc.syscall(L(442), L(-100), ctypes.c_char_p(path.encode()), L(flags), attr, L(32)) == 0
tries = [NS | PID | NET | IPC | UTS, NS | NET, NET] if root else [USER | NS | PID | NET | IPC | UTS, USER | NET]
flags, why = 0, {}  # why: syscall -> errno of what the kernel refused (the parent explains it)
if cfg["namespaces"]:
    for f in tries:
        if libc.unshare(f) == 0:
            flags = f
            break
        why.setdefault("unshare", ctypes.get_errno())  # the fullest set's refusal
if flags & USER:
    uid, gid = os.getuid(), os.getgid()
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        try:
            with open(f"/proc/self/{name}", "w") as fh:
                fh.write(text)
        except OSError:
            pass
if flags & NET:
    got.append("netns")
if flags & NS:
    mount(None, "/", None, (1 << 14) | (1 << 18))  # MS_REC | MS_PRIVATE
    mount(work, work, None, 4096 | (1 << 14))  # MS_BIND | MS_REC: the workdir as its own mount
    os.chdir(work)  # step onto the new mount (the old cwd is the directory under it)
if not flags & PID:
    libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphans (setsid daemons) come back to us
def reap_tree():
    """Kill and reap every descendant (orphans are reparented to us: we are their subreaper)."""
    import time
    me = str(os.getpid())
    for _ in range(500):
        parent = {}
        for p in os.listdir("/proc"):
            try:
                with open(f"/proc/{p}/stat") as fh:
                    parent[p] = fh.read().rsplit(")", 1)[1].split()[1]
            except (OSError, IndexError):
                pass
        tree, todo = [], [me]
        while todo:
            cur = todo.pop()
            kids = [p for p, pp in parent.items() if pp == cur]
            tree += kids
            todo += kids
        for p in tree:
            try:
                os.kill(int(p), 9)
            except OSError:
                pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            if not tree:
                return
        time.sleep(0.005)
pid = os.fork()  # the launcher stays as the parent: it reaps, cleans up, and mirrors the end
if pid:
    import signal
    for fd in (0, 1, 2):
        os.close(fd)
    def stop(*_):  # the caller's "stop now"
        try:
            os.kill(pid, 9)
        except OSError:
            pass
    signal.signal(signal.SIGTERM, stop)
    status = os.waitpid(pid, 0)[1]
    if not flags & PID:  # (in a PID namespace the kernel kills the rest, and /proc is the child's)
        reap_tree()
    if os.WIFSIGNALED(status):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        try:
            signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
        except (OSError, ValueError):
            pass
        os.kill(os.getpid(), os.WTERMSIG(status))
    os._exit(os.waitstatus_to_exitcode(status))
if flags & PID:
    got.append("pidns")
    if flags & NS and mount("proc", "/proc", "proc", 2 | 4 | 8):
        got.append("fresh_proc")
if flags & NS:
    if setattr_("/", 0x8000, 1 | 2, 0) and setattr_(work, 0, 0, 1):  # all RO+nosuid, workdir RW
        got.append("readonly_fs")
    else:
        why["mount_setattr"] = ctypes.get_errno()
if flags & (IPC | UTS):
    got.append("ipc_uts_ns")
R = resource
lim = [(R.RLIMIT_CPU, cfg["cpu"], cfg["cpu"]), (R.RLIMIT_AS, cfg["mem"], cfg["mem"]),
       (R.RLIMIT_FSIZE, cfg["fsize"], cfg["fsize"]), (R.RLIMIT_CORE, 0, 0), (R.RLIMIT_NOFILE, 256, 256)]
nproc = cfg["nproc"]
if not (root and cfg["uid"]):  # NPROC counts the user's processes: ours plus the allowance
    me = str(os.getuid())
    for p in os.listdir("/proc"):
        try:
            with open(f"/proc/{p}/status") as fh:
                nproc += any(l.startswith("Uid:") and l.split()[1] == me for l in fh)
        except (OSError, ValueError):
            pass
lim.append((R.RLIMIT_NPROC, nproc, nproc))
for res, soft, hard in lim:
    cur = R.getrlimit(res)[1]
    hard = hard if cur == R.RLIM_INFINITY else min(hard, cur)
    try:
        R.setrlimit(res, (min(soft, hard), hard))
    except (ValueError, OSError):
        pass
got.append("rlimits")
if root and cfg["uid"]:
    u = cfg["uid"]
    os.setgroups([])
    os.setresgid(u, u, u)
    os.setresuid(u, u, u)
    if os.getuid() == u and os.geteuid() == u:
        got.append("uid")
if libc.prctl(38, 1, 0, 0, 0) == 0:  # PR_SET_NO_NEW_PRIVS
    got.append("no_new_privs")
libc.prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG: die with the launcher, even after setsid
block = "netns" not in got
if block:
    got.append("socket_patch")
fd = cfg["fd"]
os.write(fd, (json.dumps({"protections": got, "why": why}) + "\n").encode())
os.execv(sys.executable, [sys.executable, "-I", "-S", "-B", "-c", cfg["harness"], str(fd), "1" if block else "0"])
'''

HARNESS = r'''
import json, os, sys
def _fmt(e):
    s = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    return s[:300]
def _block_sockets():
    import socket, _socket
    def deny(*a, **k):
        raise PermissionError(1, "network access is disabled in this sandbox")
    class NoSocket(socket.socket):
        def __init__(self, *a, **k):
            deny()
    socket.socket = socket.SocketType = _socket.socket = _socket.SocketType = NoSocket
    for name in ("create_connection", "create_server", "fromfd"):
        setattr(socket, name, deny)
def _main():
    fd, block = int(sys.argv[1]), sys.argv[2] == "1"
    data = json.loads(sys.stdin.buffer.read().decode("utf-8"))
    marker = data.pop("marker")
    out = os.fdopen(fd, "w", buffering=1, encoding="utf-8")
    os.set_inheritable(fd, False)
    def report(*items):
        try:
            out.write(json.dumps([marker, *items]) + "\n")
            out.flush()
        except Exception:
            pass
    if block:
        _block_sockets()
    ns = {"__name__": "solution", "__builtins__": __builtins__}
    try:
        exec(compile(data["code"], "solution.py", "exec"), ns)
    except SystemExit as e:
        if e.code not in (None, 0):
            report("error", f"solution exited with SystemExit({e.code!r})")
            return
    except BaseException as e:
        report("error", _fmt(e))
        return
    for i, test in enumerate(data["tests"]):
        try:
            exec(compile(test, f"<test {i}>", "exec"), ns)
            report(i, True, None)
        except BaseException as e:
            report(i, False, _fmt(e))
    report("done")
_main()
del _main
'''

