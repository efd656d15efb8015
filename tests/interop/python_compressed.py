"""Python's `websockets`, with and without permessage-deflate, side by side on one relay.

Usage: python_compressed.py URL TOKEN COUNT
Prints `ready` once both are subscribed, then one JSON line: the extensions each
negotiated, and the SHA-256 of every message each received (COUNT each).
"""
import hashlib
import json
import sys
import threading

from websockets.sync.client import connect

url, token, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
auth = {"Authorization": f"Bearer {token}"}
clients = {
    name: connect(url, additional_headers=auth, compression=compression, max_size=None,
                  open_timeout=10)
    for name, compression in [("deflate", "deflate"), ("plain", None)]
}
print("ready", flush=True)
out = {}


def read(name, ws):
    # Both read at once: one left unread would fall behind and be dropped as slow.
    got = [ws.recv(timeout=30) for _ in range(count)]
    out[name] = {
        "extensions": [type(e).__name__ for e in ws.protocol.extensions],
        "sha256": [hashlib.sha256(m.encode()).hexdigest() for m in got],
    }


threads = [threading.Thread(target=read, args=item) for item in clients.items()]
for t in threads:
    t.start()
for t in threads:
    t.join()
for ws in clients.values():
    ws.close()
print(json.dumps(out), flush=True)
