"""Starting an aiohttp server on a TCP port so that a cancellation never leaks its socket.

Used by the embedded simulator and by ``broker serve``'s metrics endpoint.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

__all__ = ["start_listener"]


async def start_listener(
    app: web.Application, host: str, port: int, *, shutdown_timeout_s: float
) -> web.AppRunner:
    """Serve ``app`` on ``host``:``port``; the runner to clean up when done.

    The loop's ``create_server`` skips a turn once its socket listens, and a cancel landing
    there loses the server it was about to return, socket and all: it would listen until
    the loop closed. So the start is shielded, and a cancelled caller waits for it to end
    (however often it is cancelled meanwhile) and then closes what it opened.
    """
    runner = web.AppRunner(app, shutdown_timeout=shutdown_timeout_s, access_log=None)
    await runner.setup()
    start = asyncio.ensure_future(web.TCPSite(runner, host, port).start())
    try:
        await asyncio.shield(start)
    except BaseException:
        while not start.done():
            try:
                await asyncio.wait((start,))
            except asyncio.CancelledError:
                # Cancelled again (a TaskGroup's cancel and a timeout's): the cleanup must
                # still come after the start, or the socket it opens is never closed. The
                # first exception is raised below.
                continue
        if not start.cancelled():
            start.exception()  # raised above, or moot beside the cancel: seen
        await runner.cleanup()
        raise
    return runner
