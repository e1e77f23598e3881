"""Running the command line and msrun workers as real subprocesses."""
import os
import socket
import subprocess
import sys


def run_cli(*args, cwd, env_extra=None, python_prefix=None):
    env = dict(os.environ, GLOG_v="3", **(env_extra or {}))
    cmd = [sys.executable, "-c", python_prefix + "\nfrom vehiclenet.cli import main\nsys.exit(main())",
           *map(str, args)] if python_prefix else [sys.executable, "-m", "vehiclenet", *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (msrun's scheduler listens on it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
