"""A realtime-py client for the resume drills (tests/js/resume-python.test.mjs).

    resume_client.py <ws url> <token> <run> [keepalive s]

Subscribes to INSERTs of public.feed for one run and prints one JSON line per event: {"n": …} per
change, {"status": …} per subscribe state, {"system": …} per system message, {"error": …} per
channel error (realtime-py reports a system message with status "error" that way). Reads commands
from stdin, one per line: `close` closes the WebSocket the way a network change does (the client
reconnects on its own); end of input ends the client.

The optional keepalive sets the websockets library's ping_interval and ping_timeout (20 s by
default), which is how a realtime-py app notices a connection that went silent: realtime-py's own
heartbeat does not wait for replies.
"""

import asyncio
import functools
import json
import sys

import websockets
import realtime._async.client as client_module
from realtime import AsyncRealtimeClient


def emit(**line):
    print(json.dumps(line, default=str), flush=True)


async def main() -> None:
    url, token, run = sys.argv[1], sys.argv[2], sys.argv[3]
    if len(sys.argv) > 4:
        every = float(sys.argv[4])
        client_module.connect = functools.partial(
            websockets.connect, ping_interval=every, ping_timeout=every
        )
    client = AsyncRealtimeClient(url, token, max_retries=30, initial_backoff=0.5)
    await client.connect()
    channel = client.channel(f"resume-py-{run}")

    def on_change(payload):
        emit(n=payload["data"]["record"]["n"])

    def on_status(status, err):
        emit(status=getattr(status, "value", str(status)))

    def on_system(payload):
        emit(system=payload.model_dump())

    on_error = channel.on_error

    def report_error(payload):
        emit(error=payload)
        on_error(payload)

    channel.on_error = report_error
    channel.on_postgres_changes(
        "INSERT", schema="public", table="feed", filter=f"run=eq.{run}", callback=on_change
    )
    channel.on_system(on_system)
    await channel.subscribe(on_status)

    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        if line.strip() == "close" and client._ws_connection is not None:
            await client._ws_connection.close()
    await client.close()


if __name__ == "__main__":
    asyncio.run(main())
