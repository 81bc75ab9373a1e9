"""Runs one untrusted Python program under limits; started by sandbox.py as `python -I -S sandbox_child.py ...`.

Standard library only, and it must stay importable without the package: it runs in a fresh
interpreter whose working directory is a private temporary directory.

  argv: program_path memory_bytes cpu_seconds file_bytes

Order matters: limits and isolation are set up before the program's code is even read, and
the audit hook goes in last, since it also forbids what this script itself needs (ctypes).
"""

import ctypes
import resource
import sys

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000

# Audit events (https://docs.python.org/3/library/audit_events.html) the program may not raise:
# network, new processes, and loading native code that could undo the rest.
BLOCKED_EVENTS = frozenset({
    "socket.__new__", "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
    "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr", "socket.getnameinfo",
    "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
    "os.kill", "os.killpg", "pty.spawn", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function",
    "webbrowser.open", "urllib.Request", "ftplib.connect", "smtplib.connect", "http.client.connect",
})


def set_limits(memory_bytes: int, cpu_seconds: int, file_bytes: int) -> None:
  for limit, value in ((resource.RLIMIT_AS, memory_bytes), (resource.RLIMIT_DATA, memory_bytes),
                       (resource.RLIMIT_CPU, cpu_seconds), (resource.RLIMIT_FSIZE, file_bytes),
                       (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(limit, (value, value))


def leave_network() -> str:
  """Moves this process into a new, empty network namespace; returns how ("net", "user+net" or "none").

  A plain network namespace needs CAP_SYS_ADMIN (root); other users get one inside a new
  user namespace where the kernel allows that.
  """
  libc = ctypes.CDLL(None, use_errno=True)  # the interpreter's own symbols, libc's unshare among them
  for flags, name in ((CLONE_NEWNET, "net"), (CLONE_NEWUSER | CLONE_NEWNET, "user+net")):
    if libc.unshare(flags) == 0:
      return name
  return "none"


def refuse(event: str, _args: tuple) -> None:
  if event in BLOCKED_EVENTS:
    raise PermissionError(f"sandbox: {event} is not allowed")


def main() -> None:
  program_path, memory_bytes, cpu_seconds, file_bytes = sys.argv[1], *map(int, sys.argv[2:5])
  namespace = leave_network()
  set_limits(memory_bytes, cpu_seconds, file_bytes)
  sys.stderr.write(f"sandbox-network: {namespace}\n")
  sys.stderr.flush()
  with open(program_path, encoding="utf-8") as f:
    source = f.read()
  code = compile(source, "program.py", "exec")
  sys.addaudithook(refuse)  # cannot be removed once added
  exec(code, {"__name__": "__main__", "__builtins__": __builtins__})


if __name__ == "__main__":
  main()
