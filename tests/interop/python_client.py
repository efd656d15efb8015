"""An independent WebSocket client (Python `websockets`) against krux-relay.

Usage: python_client.py URL TOKEN COUNT
Prints `ready` once subscribed, then one JSON line: the events' types and seqs, whether
a ping was answered, and the close code the relay sent back.
"""
import json
import sys

from websockets.sync.client import connect

url, token, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
with connect(url, additional_headers={"Authorization": f"Bearer {token}"}, open_timeout=10) as ws:
    print("ready", flush=True)
    events = [json.loads(ws.recv(timeout=10)) for _ in range(count)]
    pong = ws.ping(b"interop").wait(timeout=5)
    ws.close(code=1000, reason="done")
    print(json.dumps({
        "types": [e["type"] for e in events],
        "seqs": [e["seq"] for e in events],
        "pong": pong,
        "close_code": ws.protocol.close_rcvd.code if ws.protocol.close_rcvd else None,
    }), flush=True)
