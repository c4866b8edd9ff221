"""A realtime-py client for the resume drills: subscribes to INSERTs of public.feed for one run and
prints one JSON line per event (changes, subscribe states, system messages) until stdin closes.

    resume_client.py <ws url> <token> <run> [ping interval s]

The optional ping interval sets the websockets library's own keepalive (ping_interval and
ping_timeout, 20 s by default), which is how a realtime-py app notices a connection that went
silent; realtime-py's heartbeat does not wait for replies.
"""

import asyncio
import functools
import json
import sys

import websockets
from realtime import AsyncRealtimeClient, RealtimeSubscribeStates
import realtime._async.client as client_module


def emit(**line):
    print(json.dumps(line), flush=True)


async def main() -> None:
    url, token, run = sys.argv[1], sys.argv[2], sys.argv[3]
    if len(sys.argv) > 4:
        every = float(sys.argv[4])
        client_module.connect = functools.partial(
            websockets.connect, ping_interval=every, ping_timeout=every
        )
    client = AsyncRealtimeClient(url, token, max_retries=20, initial_backoff=0.5)
    await client.connect()
    channel = client.channel(f"resume-py-{run}")

    def on_change(payload):
        emit(n=payload["data"]["record"]["n"])

    def on_status(status: RealtimeSubscribeStates, err):
        emit(status=status.value if hasattr(status, "value") else str(status))

    def on_system(payload):
        emit(system=payload)

    channel.on_postgres_changes(
        "INSERT", schema="public", table="feed", filter=f"run=eq.{run}", callback=on_change
    )
    channel.on_system(on_system)
    await channel.subscribe(on_status)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)
    await client.close()


if __name__ == "__main__":
    asyncio.run(main())
