#!/usr/bin/env python3
"""A krux-relay subscriber in Python (`pip install websockets`), following docs/protocol.md.

Prints each event as one JSON line on stdout, notices (replay gaps, reconnects) on stderr.
Resumes with `since` after anything that can heal, stops on what cannot.

    KRUX_TOKEN=krx_user_... python3 krux_tail.py --url ws://127.0.0.1:7701 \
        --type policy_violation,approval_requested --since 0 --count 10
"""
import argparse
import asyncio
import json
import os
import sys
import urllib.parse

import websockets

# Close codes after which reconnecting with `since` helps (docs/protocol.md, section 6).
RESUME = {1001, 1006, 1011, 1012, 1013, 4001}
# Refusals worth retrying: capacity and rate limits.
RETRY_STATUS = {429, 503}


class Stop(Exception):
    """Something retrying will not fix: the message says what to do."""


def events_url(base, filters, since):
    query = {k: v for k, v in filters.items() if v}
    if since is not None:
        query["since"] = str(since)
    base = base.rstrip("/").removesuffix("/events")
    qs = urllib.parse.urlencode(query, safe=",")
    return f"{base}/events" + (f"?{qs}" if qs else "")


async def stream_once(args, state):
    """One connection: prints events until it ends; returns normally when --count is met."""
    url = events_url(args.url, {"agent": args.agent, "type": args.type, "session": args.session},
                     state["since"])
    headers = {"Authorization": f"Bearer {args.token}"}
    try:
        # permessage-deflate (websockets' default, said here): the relay compresses each
        # event once for every subscriber that asks, and sends small ones as they are.
        ws = await websockets.connect(url, additional_headers=headers, max_size=None,
                                      compression="deflate")
    except websockets.exceptions.InvalidStatus as e:
        status = e.response.status_code
        body = e.response.body.decode(errors="replace").strip()
        if status in RETRY_STATUS:
            raise ConnectionError(f"refused {status}: {body}")
        raise Stop(f"the relay refused the subscription: {status} {body}")
    async with ws:
        if state["since"] is None:
            # Nothing received yet: the relay's position when we subscribed is where a
            # resume must start, so nothing published meanwhile is missed.
            state["since"] = int(ws.response.headers.get("Krux-Seq", "0"))
        try:
            async for text in ws:
                event = json.loads(text)
                if "seq" not in event:
                    # A notice (replay_gap): show it, keep the resume point.
                    print(f"notice: {text}", file=sys.stderr, flush=True)
                    continue
                print(text, flush=True)
                state["since"] = event["seq"]
                state["seen"] += 1
                if args.count and state["seen"] >= args.count:
                    return True
        except websockets.exceptions.ConnectionClosed:
            pass  # judged by its close code below
    code, reason = ws.close_code or 1006, ws.close_reason
    if code == 1000:
        return True
    if code in RESUME:
        raise ConnectionError(f"closed {code} {reason}")
    raise Stop(f"closed {code} {reason}")


async def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="ws://127.0.0.1:7701")
    p.add_argument("--token", default=os.environ.get("KRUX_TOKEN"))
    p.add_argument("--agent")
    p.add_argument("--type")
    p.add_argument("--session")
    p.add_argument("--since", type=int)
    p.add_argument("--count", type=int, help="exit after this many events")
    args = p.parse_args()
    if not args.token:
        sys.exit("a user token is needed: --token or KRUX_TOKEN")
    state = {"since": args.since, "seen": 0}
    delay = 0.25
    while True:
        seen = state["seen"]
        try:
            if await stream_once(args, state):
                return 0
            raise ConnectionError("the connection ended")
        except Stop as e:
            print(e, file=sys.stderr)
            return 1
        except (ConnectionError, OSError, websockets.exceptions.WebSocketException) as e:
            if state["seen"] > seen:
                delay = 0.25
            print(f"{e}; reconnecting in {delay:.2f}s after seq {state['since']}",
                  file=sys.stderr, flush=True)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 8)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
