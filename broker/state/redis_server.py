"""A throwaway ``redis-server`` on a free loopback port, for tests and benchmarks.

It runs in a temporary directory with persistence off (``--save '' --appendonly no``), so
:meth:`RedisServer.restart` brings it back *empty*, the case the daily count's high-water
marks exist for. Not part of any production path.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

__all__ = ["RedisServer", "free_port", "redis_server_binary"]


def redis_server_binary() -> str | None:
    """The ``redis-server`` on PATH (or Debian's /usr/bin one), None when there is none."""
    found = shutil.which("redis-server")
    if found is None and Path("/usr/bin/redis-server").exists():
        found = "/usr/bin/redis-server"
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


#: Ports tried before giving up when each one found free was taken before the server bound it.
_PORT_TRIES = 5


def _server_pid(port: int, password: str | None) -> int | None:
    """The ``process_id`` the server on ``port`` reports (``None``: it refused to say, as
    a server with another password does).

    Raises:
        OSError: nothing answers on the port yet.
    """
    from redis import Redis
    from redis.exceptions import AuthenticationError, RedisError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    client = Redis(host="127.0.0.1", port=port, password=password, socket_timeout=1.0)
    try:
        return int(client.info("server")["process_id"])
    except AuthenticationError:
        return None  # a server of another password (an AuthenticationError is a "connection" one)
    except (RedisConnectionError, RedisTimeoutError) as exc:
        raise OSError(str(exc)) from exc
    except RedisError:
        return None
    finally:
        client.close()


class RedisServer:
    """Start ``redis-server`` on ``127.0.0.1:port`` in a temp dir; stop it on exit.

    Args:
        port: the port (a free one when None); kept across :meth:`stop`/:meth:`start`.
        password: ``requirepass`` when given.
    """

    def __init__(self, port: int | None = None, *, password: str | None = None) -> None:
        binary = redis_server_binary()
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        self._binary = binary
        self.port = port if port is not None else free_port()
        self._port_given = port is not None
        self._started_once = False
        self._exit_code: int | None = None  # of the last server that exited at start
        self._password = password
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start the server (empty) and wait until it answers as itself.

        A port found free may be taken by another process (a parallel test worker) before
        the server binds it: the server then exits, and meanwhile the port may answer with
        that other server. Only a server telling this one's pid counts as started; on a
        port this object chose and never started on, another port is tried.

        Raises:
            RuntimeError: the server could not start (on the caller's port, or ever).
        """
        for _ in range(_PORT_TRIES):
            if self._launch():
                self._started_once = True
                return
            if self._port_given or self._started_once:
                break
            self.port = free_port()
        self.__exit__(None, None, None)
        exited = "" if self._exit_code is None else f" (it exited with {self._exit_code})"
        raise RuntimeError(f"redis-server could not start on 127.0.0.1:{self.port}{exited}")

    def _launch(self) -> bool:
        """Start the server on ``self.port``; False when another process holds the port."""
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="broker-redis-")
        argv = [
            self._binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self._dir.name,
        ]
        if self._password is not None:
            argv += ["--requirepass", self._password]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._proc = proc
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self._proc = None
                self._exit_code = proc.returncode
                return False
            try:
                pid = _server_pid(self.port, self._password)
            except OSError:
                time.sleep(0.02)
                continue
            if pid == proc.pid:
                return True
            self.stop()  # another server holds the port: this one cannot bind it
            self._exit_code = None
            return False
        self.stop()
        raise RuntimeError("redis-server did not start within 10 s")

    def stop(self) -> None:
        """Stop the server (its data is gone: persistence is off)."""
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def restart(self) -> None:
        """Stop and start again on the same port: an empty Redis, as after a crash."""
        self.stop()
        self.start()

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None
