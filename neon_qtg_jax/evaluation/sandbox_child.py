"""Runs one untrusted Python program under limits; started by sandbox.py as `python -I -S sandbox_child.py ...`.

Standard library only, and it must stay importable without the package: it runs in a fresh
interpreter, either inside bubblewrap or on the host (then it builds the same view itself).

  argv: isolation work_dir program_path memory_bytes cpu_seconds file_bytes [read_only_dir ...]

isolation "bwrap": bubblewrap already gave this process its file system view and namespaces.
isolation "namespaces": before the program is read, this process enters new user, mount and
network namespaces, builds a read-only root holding only the read-only dirs (the interpreter)
and work_dir (writable, at /sandbox), pivots into it, detaches the host's tree and drops every
capability. isolation "none" (only with the caller's explicit unsafe flag): network and audit
hook only. The audit hook goes in last, since it also forbids what this script needs (ctypes).
"""

import ctypes
import os
import platform
import resource
import sys
import traceback

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 1024, 2048, 1 << 21
MNT_DETACH = 2
PR_SET_NO_NEW_PRIVS, PR_CAPBSET_DROP = 38, 24
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}
SANDBOX_DIR = "/sandbox"
MAX_THREADS = 32  # threads the program may start; a flood is refused rather than left to exhaust memory

# Audit events (https://docs.python.org/3/library/audit_events.html) the program may not raise:
# network, new processes, and loading native code that could undo the rest.
BLOCKED_EVENTS = frozenset({
    "socket.__new__", "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
    "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr", "socket.getnameinfo",
    "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
    "os.kill", "os.killpg", "pty.spawn", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function",
    "webbrowser.open", "urllib.Request", "ftplib.connect", "smtplib.connect", "http.client.connect",
})
BLOCKED_IMPORTS = frozenset({"_posixsubprocess", "_ctypes", "_xxsubinterpreters"})  # fork/exec and native calls


def set_limits(memory_bytes: int, cpu_seconds: int, file_bytes: int) -> None:
  for limit, value in ((resource.RLIMIT_AS, memory_bytes), (resource.RLIMIT_DATA, memory_bytes),
                       (resource.RLIMIT_CPU, cpu_seconds), (resource.RLIMIT_FSIZE, file_bytes),
                       (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(limit, (value, value))


def _check(libc, result: int, what: str) -> None:
  if result != 0:
    errno = ctypes.get_errno()
    raise OSError(errno, f"sandbox: {what}: {os.strerror(errno)}")


def _locked_flags(path: str) -> int:
  """The mount flags a user namespace may not clear on a read-only remount of `path`'s mount."""
  f = os.statvfs(path).f_flag
  flags = 0
  for st, ms in ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC),
                 (os.ST_NOATIME, MS_NOATIME), (os.ST_NODIRATIME, MS_NODIRATIME), (os.ST_RELATIME, MS_RELATIME)):
    if f & st:
      flags |= ms
  return flags


def enter_namespaces(work_dir: str, read_only_dirs: list[str]) -> str:
  """New user+mount+net namespaces, a read-only root of read_only_dirs plus work_dir at /sandbox; returns "user+net"."""
  libc = ctypes.CDLL(None, use_errno=True)  # the interpreter's own symbols: unshare, mount, umount2, syscall
  libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
  uid, gid = os.getuid(), os.getgid()
  _check(libc, libc.unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET), "unshare(user, mount, net)")
  for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
    with open(f"/proc/self/{name}", "w") as f:
      f.write(text)

  def mount(source, target, fstype, flags, data=None):
    enc = lambda s: s.encode() if s is not None else None
    _check(libc, libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")

  mount(None, "/", None, MS_REC | MS_PRIVATE)
  root = os.path.join(os.path.dirname(work_dir), "root")
  os.makedirs(root, exist_ok=True)
  mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=0755")
  for path in read_only_dirs:
    target = root + path
    if os.path.islink(path):
      os.makedirs(os.path.dirname(target), exist_ok=True)
      os.symlink(os.readlink(path), target)
      continue
    os.makedirs(target, exist_ok=True)
    mount(path, target, None, MS_BIND | MS_REC)
    mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | _locked_flags(path))
  os.makedirs(root + SANDBOX_DIR)
  mount(work_dir, root + SANDBOX_DIR, None, MS_BIND)
  os.chdir(root)
  _check(libc, libc.syscall(SYS_PIVOT_ROOT[platform.machine()], b".", b"."), "pivot_root")
  _check(libc, libc.umount2(b".", MNT_DETACH), "detach the host's root")  # the old root, stacked under "."
  os.chdir("/")
  mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
  os.chdir(SANDBOX_DIR)
  _check(libc, libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
  for cap in range(64):
    libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)  # past the last capability it fails harmlessly
  header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
  data = (ctypes.c_uint32 * 6)()                   # effective, permitted, inheritable: all empty
  _check(libc, libc.capset(header, data), "drop capabilities")
  return "user+net"


def leave_network() -> str:
  """Moves this process into a new, empty network namespace; returns how ("net", "user+net" or "none")."""
  libc = ctypes.CDLL(None, use_errno=True)
  for flags, name in ((CLONE_NEWNET, "net"), (CLONE_NEWUSER | CLONE_NEWNET, "user+net")):
    if libc.unshare(flags) == 0:
      return name
  return "none"


def refuse(event: str, args: tuple) -> None:
  if event in BLOCKED_EVENTS or (event == "import" and args[0] in BLOCKED_IMPORTS):
    raise PermissionError(f"sandbox: {event} {args[0] if event == 'import' else ''} is not allowed".rstrip())


def limit_threads() -> None:
  """Threads past MAX_THREADS raise (Python 3.11 has no audit event for a new thread).

  The address-space limit bounds threads too (each stack is reserved from it); this makes a
  flood a prompt, clear error rather than a slow exhaustion.
  """
  import _thread
  start, started = _thread.start_new_thread, [0]

  def start_new_thread(function, args, kwargs=None):
    started[0] += 1
    if started[0] > MAX_THREADS:
      raise PermissionError(f"sandbox: more than {MAX_THREADS} threads are not allowed")
    return start(function, args, kwargs or {})

  _thread.start_new_thread = _thread.start_new = start_new_thread


def main() -> None:
  isolation, work_dir, program_path = sys.argv[1:4]
  memory_bytes, cpu_seconds, file_bytes = map(int, sys.argv[4:7])
  read_only_dirs = sys.argv[7:]
  if isolation == "bwrap":
    network = "bwrap"
  elif isolation == "namespaces":
    network = enter_namespaces(work_dir, read_only_dirs)
    program_path = os.path.join(SANDBOX_DIR, os.path.basename(program_path))
  else:
    network = leave_network()
  set_limits(memory_bytes, cpu_seconds, file_bytes)
  sys.stderr.write(f"sandbox-network: {network}\n")
  sys.stderr.flush()
  with open(program_path, encoding="utf-8") as f:
    source = f.read()
  code = compile(source, "program.py", "exec")
  limit_threads()
  sys.addaudithook(refuse)  # cannot be removed once added
  try:
    exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
  except SystemExit:
    raise
  except BaseException:  # failed: report it now rather than wait for threads the program left running
    traceback.print_exc()
    sys.stderr.flush()
    os._exit(1)


if __name__ == "__main__":
  main()
