"""Runs one untrusted Python program under limits; started by sandbox.py as `python -I -S sandbox_child.py ...`.

Standard library only, and it must stay importable without the package: it runs in a fresh
interpreter, either inside bubblewrap or on the host (then it builds the same view itself).

  argv: isolation work_dir program_path memory_bytes cpu_seconds file_bytes disk_bytes token_fd verdict_fd
        status_fd layers channel [read_only_dir ...]
        (the program's own interpreter: "program" program_path token_fd verdict_fd layers channel)
  channel: "read_fd,write_fd" of a pipe pair to another sandboxed program (sandbox.run_pair), given to
        the program as the global `__channel__`, or "-".

Processes, each started before any of the program's code is read:

  (namespaces only) outer   enters new user, mount, pid, net, ipc and uts namespaces, builds a
                            read-only root of the read-only dirs plus a tmpfs of disk_bytes at
                            /sandbox (the only writable place) holding the program and this file,
                            pivots into it, drops every capability, forks the supervisor and exits
                            with its status;
  supervisor                PID 1 of the pid namespace (bwrap: PID 2, under bwrap's own init);
                            forks the program's process, waits for it and writes "network ..." and
                            "exit N" / "signal N" to status_fd, which only it holds. When it exits
                            the kernel kills everything left in the pid namespace;
  program                   sets the rlimits and the parent-death signal, loads the seccomp filter
                            (layer "seccomp": no new process, no exec but the one below, no
                            signals, no ptrace, no namespaces or mounts), then execs a fresh
                            interpreter of this file ("program"), which never imports ctypes: it
                            reads the per-run token from token_fd and closes it, installs the
                            audit hook (layer "python") and runs the program in a second thread.

The pass verdict: the program's thread runs exec(program), flushes stdout and stderr and then
releases a lock; only then does the main thread, which runs no code of the program, write the
token to verdict_fd and exit 0. SystemExit, os._exit, a signal, a closed stdout or any
exception leave the lock held and the token unwritten. The token is never in argv, the
environment or a file; in the process it is held only by objects the program's thread has no
reference to (the audit hook refuses the introspection that could reach them).
"""

import collections
import functools
import operator
import os
import platform
import resource
import signal
import sys
import traceback
import types

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
CLONE_THREAD = 0x00010000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 1024, 2048, 1 << 21
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, PR_CAPBSET_DROP = 1, 38, 24
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}
SANDBOX_DIR = "/sandbox"
TOKEN_BYTES = 64  # hex characters of the per-run token
MIN_EXEC_FD = 255  # the descriptor of the one exec the filter allows; no descriptor at or above it can be made
MAX_THREADS = 32  # threads the program may start; a flood is refused rather than left to exhaust memory

# Syscalls the program's process may not make (EPERM): new processes and exec, signals to any
# process, tracing or reading other processes, new namespaces, mounts and the kernel interfaces
# containers close off. clone is allowed for threads only; clone3 answers ENOSYS, so glibc falls
# back to clone for threads; execveat only of the descriptor load_seccomp is given.
DENIED_SYSCALLS = (
    "fork", "vfork", "execve",
    "kill", "tkill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo",
    "pidfd_open", "pidfd_send_signal", "pidfd_getfd",
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp",
    "unshare", "setns", "mount", "umount2", "pivot_root", "chroot", "open_tree", "move_mount",
    "fsopen", "fsmount", "fsconfig", "fspick", "mount_setattr", "name_to_handle_at", "open_by_handle_at",
    "memfd_create", "bpf", "perf_event_open", "userfaultfd", "keyctl", "add_key", "request_key",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load", "reboot",
    "swapon", "swapoff", "acct", "quotactl", "syslog", "iopl", "ioperm",
)

# Audit events (https://docs.python.org/3/library/audit_events.html) the program may not raise:
# network, new processes, native code, and the introspection that reaches other threads' frames,
# every object, or changes the interpreter's hooks.
BLOCKED_EVENTS = frozenset({
    "socket.__new__", "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
    "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr", "socket.getnameinfo",
    "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
    "os.kill", "os.killpg", "signal.pthread_kill", "pty.spawn",
    "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function",
    "webbrowser.open", "urllib.Request", "ftplib.connect", "smtplib.connect", "http.client.connect",
    "sys._current_frames", "sys._current_exceptions", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
    "sys.addaudithook", "sys.settrace", "sys.setprofile",
    # Bytecode: a hand-made code object (a LOAD_FAST past its frame reads the interpreter's memory) comes from
    # the code constructor or code.replace (code.__new__) or from marshal data: marshal.loads, a sourceless
    # .pyc import, _imp.get_frozen_object(name, data). Imports compile from source instead (source_only_imports).
    "code.__new__", "marshal.loads", "marshal.load",
})
# Module name prefixes the program may not import: fork/exec, native calls, subinterpreters, and
# CPython's test modules (_testcapi and the like reach raw memory).
BLOCKED_IMPORTS = ("_posixsubprocess", "_ctypes", "_xxsubinterpreters", "_xxinterpchannels", "_test")


def set_limits(memory_bytes: int, cpu_seconds: int, file_bytes: int) -> None:
  """Address space, data, file size and core: soft = hard. CPU: SIGXCPU at the soft limit, SIGKILL 1 s later."""
  for limit, value in ((resource.RLIMIT_AS, memory_bytes), (resource.RLIMIT_DATA, memory_bytes),
                       (resource.RLIMIT_FSIZE, file_bytes), (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(limit, (value, value))
  resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))


def _libc():
  import ctypes
  libc = ctypes.CDLL(None, use_errno=True)  # the interpreter's own symbols: unshare, mount, umount2, syscall, prctl
  libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
  libc.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
  return libc


def _check(result: int, what: str) -> None:
  import ctypes
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


def enter_namespaces(program_path: str, disk_bytes: int, read_only_dirs: list[str]) -> str:
  """New user, mount, pid, net, ipc and uts namespaces; a read-only root of read_only_dirs, a tmpfs at /sandbox.

  /sandbox (disk_bytes, the only writable place) starts with copies of the program and this file.

  The pid namespace takes effect for this process's children: the next fork is its PID 1.
  Returns how the network was cut ("user+net").
  """
  import ctypes
  libc = _libc()
  uid, gid = os.getuid(), os.getgid()
  _check(libc.unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS),
         "unshare(user, mount, pid, net, ipc, uts)")
  for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
    with open(f"/proc/self/{name}", "w") as f:
      f.write(text)

  def mount(source, target, fstype, flags, data=None):
    enc = lambda s: s.encode() if s is not None else None
    _check(libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")

  mount(None, "/", None, MS_REC | MS_PRIVATE)
  root = os.path.join(os.path.dirname(os.path.dirname(program_path)), "root")
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
  mount("tmpfs", root + SANDBOX_DIR, "tmpfs", MS_NOSUID | MS_NODEV,
        f"size={disk_bytes},nr_inodes={max(64, disk_bytes // 4096)},mode=0755")  # a file per page at most
  for path in (program_path, os.path.abspath(__file__)):
    with open(path, "rb") as src, open(root + SANDBOX_DIR + "/" + os.path.basename(path), "wb") as dst:
      dst.write(src.read())
  os.chdir(root)
  _check(libc.syscall(SYS_PIVOT_ROOT[platform.machine()], b".", b"."), "pivot_root")
  _check(libc.umount2(b".", MNT_DETACH), "detach the host's root")  # the old root, stacked under "."
  os.chdir("/")
  mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
  os.chdir(SANDBOX_DIR)
  _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
  for cap in range(64):
    libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)  # past the last capability it fails harmlessly
  header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
  data = (ctypes.c_uint32 * 6)()                   # effective, permitted, inheritable: all empty
  _check(libc.capset(header, data), "drop capabilities")
  return "user+net"


def leave_network() -> str:
  """Moves this process into a new, empty network namespace; returns how ("net", "user+net" or "none")."""
  libc = _libc()
  for flags, name in ((CLONE_NEWNET, "net"), (CLONE_NEWUSER | CLONE_NEWNET, "user+net")):
    if libc.unshare(flags) == 0:
      return name
  return "none"


def die_with_parent() -> None:
  _check(_libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "die with the parent")


def load_seccomp(exec_fd: int) -> None:
  """Refuses DENIED_SYSCALLS, clone without CLONE_THREAD, execveat of any descriptor but exec_fd and
  prctl(PR_SET_PDEATHSIG) to this process, its threads and what it execs.

  Through libseccomp (Debian package libseccomp2, which apt itself needs): it resolves syscall
  names per architecture and kills calls of other ABIs (x32, i386) that would bypass the filter.
  """
  import ctypes

  class ArgCmp(ctypes.Structure):  # libseccomp's struct scmp_arg_cmp
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]

  try:
    lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
  except OSError as err:
    raise OSError(f"sandbox: libseccomp not found ({err}); install it: apt-get install libseccomp2") from err
  lib.seccomp_init.restype = ctypes.c_void_p
  lib.seccomp_init.argtypes = (ctypes.c_uint32,)
  lib.seccomp_syscall_resolve_name.argtypes = (ctypes.c_char_p,)
  lib.seccomp_rule_add_array.argtypes = (ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                         ctypes.POINTER(ArgCmp))
  lib.seccomp_load.argtypes = lib.seccomp_release.argtypes = (ctypes.c_void_p,)
  allow, errno_action = 0x7FFF0000, lambda e: 0x00050000 | e  # SCMP_ACT_ALLOW, SCMP_ACT_ERRNO(e)
  not_equal, equal, masked_eq = 1, 4, 7                        # SCMP_CMP_NE, SCMP_CMP_EQ, SCMP_CMP_MASKED_EQ
  ctx = lib.seccomp_init(allow)
  if not ctx:
    raise OSError("sandbox: seccomp_init failed")

  def rule(name: str, action: int, *compare: ArgCmp) -> None:
    number = lib.seccomp_syscall_resolve_name(name.encode())
    if number == -1:  # __NR_SCMP_ERROR: a name libseccomp does not know (older library); nothing to refuse
      return
    array = (ArgCmp * len(compare))(*compare) if compare else None
    result = lib.seccomp_rule_add_array(ctx, action, number, len(compare), array)
    if result < 0:
      raise OSError(-result, f"sandbox: seccomp rule for {name}: {os.strerror(-result)}")

  try:
    for name in DENIED_SYSCALLS:
      rule(name, errno_action(1))  # EPERM
    rule("clone", errno_action(1), ArgCmp(0, masked_eq, CLONE_THREAD, 0))
    rule("clone3", errno_action(38))  # ENOSYS: its flags sit behind a pointer the filter cannot read
    rule("execveat", errno_action(1), ArgCmp(0, not_equal, exec_fd, 0))
    rule("prctl", errno_action(1), ArgCmp(0, equal, PR_SET_PDEATHSIG, 0))
    result = lib.seccomp_load(ctx)  # also sets no_new_privs
    if result < 0:
      raise OSError(-result, f"sandbox: seccomp_load: {os.strerror(-result)}")
  finally:
    lib.seccomp_release(ctx)


def audit_hook(blocked_events: frozenset, blocked_imports: tuple, native_roots: tuple = (), error=PermissionError):
  """The hook refusing blocked_events, imports of blocked_imports prefixes and native modules (an import event
  naming a file) from outside native_roots (the interpreter's read-only directories: a module the program wrote
  into /sandbox would be native code of its choosing); its policy lives in this closure only, which nothing
  stores."""

  def outside(path) -> bool:
    path = str(path)
    return not native_roots or ".." in path.split("/") or not path.startswith(native_roots)

  def refuse(event: str, args: tuple) -> None:
    if event in blocked_events or (event == "import" and (str(args[0]).startswith(blocked_imports) or (
        len(args) > 1 and args[1] is not None and outside(args[1])))):
      raise error(f"sandbox: {event} {args[0]} is not allowed" if event == "import" else
                  f"sandbox: {event} is not allowed")

  return refuse


def read_only_roots() -> tuple[str, ...]:
  """The interpreter's own directories ("/usr/", the prefixes), each ending in "/": inside the sandbox, read-only."""
  roots = {"/usr", sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
  return tuple(sorted(os.path.normpath(r).rstrip("/") + "/" for r in roots if r))


# What HumanEval's prompts, solutions and tests import: loaded from the interpreter's cached bytecode before
# the audit hook, since afterwards an import compiles its source (marshal is closed).
PRELOADED = ("typing", "math", "random", "copy", "string", "collections", "re", "hashlib", "itertools", "functools")


def source_only_imports() -> None:
  """Preloads PRELOADED, then makes every later import compile the module's source: no .pyc is read (reading one
  is marshal.loads, which the audit hook refuses), and a directory holding only a .pyc has no module."""
  import importlib
  import importlib.machinery as machinery
  for name in PRELOADED:
    importlib.import_module(name)

  class SourceOnlyLoader(machinery.SourceFileLoader):
    def get_code(self, fullname):
      path = self.get_filename(fullname)
      return self.source_to_code(self.get_data(path), path)

  details = [(machinery.ExtensionFileLoader, machinery.EXTENSION_SUFFIXES),
             (SourceOnlyLoader, machinery.SOURCE_SUFFIXES)]
  sys.path_hooks[:] = [h for h in sys.path_hooks if "FileFinder" not in getattr(h, "__qualname__", "")]
  sys.path_hooks.append(machinery.FileFinder.path_hook(*details))
  sys.path_importer_cache.clear()
  sys.dont_write_bytecode = True


def limit_threads(start_new_thread, max_threads: int, error=PermissionError) -> None:
  """Threads past max_threads raise (Python 3.11 has no audit event for a new thread).

  The address-space limit bounds threads too (each stack is reserved from it); this makes a
  flood a prompt, clear error rather than a slow exhaustion.
  """
  import _thread
  started = [0]

  def counted_start(function, args, kwargs=None):
    started[0] += 1
    if started[0] > max_threads:
      raise error(f"sandbox: more than {max_threads} threads are not allowed")
    return start_new_thread(function, args, kwargs or {})

  _thread.start_new_thread = _thread.start_new = counted_start


def read_token(fd: int) -> bytes:
  token = b""
  while len(token) < TOKEN_BYTES:
    chunk = os.read(fd, TOKEN_BYTES - len(token))
    if not chunk:
      break
    token += chunk
  os.close(fd)
  return token


def run_in_thread(box: list) -> None:
  """The program's thread: box holds one callable, popped so that no frame of this thread refers to it."""
  try:
    box.pop()()
  except BaseException:  # SystemExit included: failed. Report now rather than wait for threads left running.
    traceback.print_exc()
    for stream in (sys.stdout, sys.stderr):
      try:
        stream.flush()
      except Exception:  # a stream the program closed
        pass
    os._exit(1)


def exec_program(script: str, program_path: str, fds: tuple[int, int], limits: tuple[int, int, int],
                 layers: set[str], channel: tuple[int, ...] = ()) -> None:
  """The program's process, before its interpreter: rlimits, parent-death signal, seccomp, then exec (never returns).

  The exec goes through a descriptor at or above every other and the descriptor limit then
  goes below it, so nothing the program does can make another descriptor the filter's one exec
  would accept; it is closed on exec.
  """
  die_with_parent()
  set_limits(*limits)
  exec_fd = max([MIN_EXEC_FD, *(fd + 1 for fd in (*fds, *channel))])
  interpreter = os.open(sys.executable, os.O_RDONLY | os.O_CLOEXEC)
  os.dup2(interpreter, exec_fd, inheritable=False)
  os.close(interpreter)
  resource.setrlimit(resource.RLIMIT_NOFILE, (exec_fd, exec_fd))
  if "seccomp" in layers:
    load_seccomp(exec_fd)
  os.execve(exec_fd, [sys.executable, "-I", "-S", script, "program", program_path, *map(str, fds), ",".join(layers),
                      ",".join(map(str, channel)) or "-"], dict(os.environ))


def program_main(program_path: str, token_fd: int, verdict_fd: int, layers: set[str],
                 channel: tuple[int, ...] = ()) -> None:
  """The program's own interpreter (ctypes never imported): the audit hook, then the program in a second thread."""
  import _thread
  with open(program_path, encoding="utf-8") as f:
    code = compile(f.read(), "program.py", "exec")
  # Python ignores SIGXFSZ: a program printing past the output limit would only get failing writes until
  # the wall clock. With the default action the kernel ends it at the limit.
  signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
  start_new_thread, exit_now, write = _thread.start_new_thread, os._exit, os.write
  call = operator.methodcaller("__call__")
  module = types.ModuleType("__main__")
  module.__builtins__ = __builtins__
  if channel:
    module.__dict__["__channel__"] = channel
  wrapper = sys.modules["__main__"]  # noqa: F841  (keeps this module's globals alive while the program runs)
  sys.modules["__main__"] = module
  done = _thread.allocate_lock()
  done.acquire()
  box = [functools.partial(collections.deque, map(call, [
      functools.partial(exec, code, module.__dict__), sys.stdout.flush, sys.stderr.flush, done.release]), 0)]
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # _thread.interrupt_main() from the program does nothing
  if "python" in layers:
    limit_threads(start_new_thread, MAX_THREADS)
    source_only_imports()
    sys.addaudithook(audit_hook(BLOCKED_EVENTS, BLOCKED_IMPORTS, read_only_roots()))  # cannot be removed once added
  # The token is read (and its descriptor closed) while the list is built, before the program's thread
  # starts; it is then held only by the partial, which only this thread's C stack refers to.
  try:  # from here on this thread runs no Python code the program could reach or replace
    collections.deque(map(call, [functools.partial(start_new_thread, run_in_thread, (box,)), done.acquire,
                                 functools.partial(write, verdict_fd, read_token(token_fd)),
                                 functools.partial(exit_now, 0)]), 0)
  finally:
    exit_now(1)


def supervise(script: str, program_path: str, network: str, fds: tuple[int, int, int],
              limits: tuple[int, int, int], layers: set[str], channel: tuple[int, ...] = ()) -> None:
  """Forks the program's process, waits for it, writes its end to the status descriptor; exits."""
  token_fd, verdict_fd, status_fd = fds
  os.write(status_fd, f"network {network}\n".encode())
  pid = os.fork()
  if pid == 0:
    try:
      os.close(status_fd)
      exec_program(script, program_path, (token_fd, verdict_fd), limits, layers, channel)
    except BaseException:  # a layer that could not be set up
      traceback.print_exc()
      sys.stderr.flush()
    os._exit(1)
  for fd in (token_fd, verdict_fd, *channel):  # the program alone holds the channel: its end is the other's EOF
    os.close(fd)
  _, status = os.waitpid(pid, 0)
  end = f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"exit {os.WEXITSTATUS(status)}"
  os.write(status_fd, f"{end}\n".encode())
  os._exit(0)


def main() -> None:
  if sys.argv[1] == "program":
    program_path, token_fd, verdict_fd, layers = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    program_main(program_path, token_fd, verdict_fd, set(filter(None, layers.split(","))), parse_channel(sys.argv[6]))
  isolation, work_dir, program_path = sys.argv[1:4]
  memory_bytes, cpu_seconds, file_bytes, disk_bytes, token_fd, verdict_fd, status_fd = map(int, sys.argv[4:11])
  layers = set(filter(None, sys.argv[11].split(",")))
  channel = parse_channel(sys.argv[12])
  read_only_dirs = sys.argv[13:]
  fds, limits = (token_fd, verdict_fd, status_fd), (memory_bytes, cpu_seconds, file_bytes)
  script = os.path.abspath(__file__)
  die_with_parent()
  if isolation == "bwrap":  # bubblewrap made the namespaces; this process is PID 2 under its init
    supervise(script, program_path, "bwrap", fds, limits, layers, channel)
  if isolation == "namespaces":
    network = enter_namespaces(program_path, disk_bytes, read_only_dirs)
    pid = os.fork()  # PID 1 of the new pid namespace
    if pid == 0:
      die_with_parent()
      in_view = lambda path: os.path.join(SANDBOX_DIR, os.path.basename(path))
      supervise(in_view(script), in_view(program_path), network, fds, limits, layers, channel)
    for fd in (*fds, *channel):
      os.close(fd)
    _, status = os.waitpid(pid, 0)
    os._exit(os.waitstatus_to_exitcode(status) & 0xFF)
  supervise(script, program_path, leave_network(), fds, limits, layers, channel)


def parse_channel(text: str) -> tuple[int, ...]:
  return () if text == "-" else tuple(int(fd) for fd in text.split(","))


if __name__ == "__main__":
  main()
