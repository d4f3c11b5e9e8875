"""A local attacker on the agent's socket: holds COUNT connections open, each misbehaving in
its own way, and opens a new one whenever the agent drops one. Prints ``ready`` once COUNT
connections were attempted; runs until killed. Standard library only (a throwaway user runs it
with the system Python).

    hostile_client.py SOCKET COUNT
"""

from __future__ import annotations

import selectors
import signal
import socket
import sys
import time

#: What each connection does, in turn: say nothing; drip a register message a byte at a time;
#: send a line longer than any message; send deeply nested JSON; register, then send garbage.
MODES = ("idle", "drip", "oversized", "nested", "garbage")
DRIP = b'{"v": 2, "op": "register", "signal": "SIGUSR1"}\n'


def open_one(path: str, mode: str) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        sock.connect(path)
        if mode == "oversized":
            sock.send(b"x" * 65536)
        elif mode == "nested":
            sock.send(b"[" * 4000 + b"\n")
        elif mode == "garbage":
            sock.send(DRIP + b"\x00\xff not json\n")
    except OSError:
        sock.close()
        return None
    return sock


def main() -> None:
    path, count = sys.argv[1], int(sys.argv[2])
    # Its "garbage" connections register (as itself) before they misbehave: a notice served
    # meanwhile signals the attacker, as it asked. That must not end the flood.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    selector = selectors.DefaultSelector()
    dripping: dict[socket.socket, int] = {}

    def add(index: int) -> None:
        mode = MODES[index % len(MODES)]
        sock = open_one(path, mode)
        if sock is None:
            return
        selector.register(sock, selectors.EVENT_READ, index)
        if mode == "drip":
            dripping[sock] = 0

    for index in range(count):
        add(index)
    print("ready", flush=True)
    while True:
        for key, _ in selector.select(0.5):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:  # dropped: come back at once
                selector.unregister(sock)
                dripping.pop(sock, None)
                sock.close()
                time.sleep(0.001)
                add(key.data)
        for sock, sent in list(dripping.items()):
            if sent < len(DRIP) - 1:  # never the newline
                try:
                    sock.send(DRIP[sent : sent + 1])
                    dripping[sock] = sent + 1
                except OSError:
                    dripping.pop(sock)


if __name__ == "__main__":
    main()
