"""One front-end flooding the server must not starve another VF (issue 13, limits).

Two simulated VFs behind one server.  Front-end A queues a flood of requests;
front-end B sends one.  Measured in the loop's own units (messages handled,
rounds), never in wall time: B's request is answered in the first round, after
at most one round's quota of A's messages (``MAX_MESSAGES_PER_ROUND``).
Before the quota, one round handled everything A had queued first.
"""
from __future__ import annotations

import logging
import socket

import pytest

from ifcvf.tools.runs.stack import SimHost
from ifcvf.vhost import protocol as p
from ifcvf.vhost import server as server_mod
from sim.config import IfcvfConfig

R = p.Request
GET_FEATURES = p.encode_request(R.GET_FEATURES)


@pytest.fixture
def host():
    h = SimHost(seed=5)
    yield h
    h.close()


def two_front_ends(host):
    a = host.connect(host.add_vf(IfcvfConfig(queue_pairs=1)))
    b = host.connect(host.add_vf(IfcvfConfig(queue_pairs=1)))
    return a, b, host.vfs[0].backend, host.vfs[1].backend


def flood(sock: socket.socket, count: int) -> int:
    """Queue up to ``count`` GET_FEATURES without waiting (until the socket is full)."""
    sock.setblocking(False)
    sent = 0
    try:
        while sent < count:
            sock.send(GET_FEATURES)
            sent += 1
    except BlockingIOError:
        pass
    return sent


def replies(sock: socket.socket) -> int:
    """Read what has arrived; the number of whole replies (all 20 bytes here)."""
    got = b""
    while True:
        try:
            chunk = sock.recv(1 << 16, socket.MSG_DONTWAIT)
        except BlockingIOError:
            break
        if not chunk:
            break
        got += chunk
    return len(got) // 20


def test_a_flooding_front_end_does_not_starve_another_vf(host):
    a, b, back_a, back_b = two_front_ends(host)
    queued = flood(a.sock, 2000)
    assert queued > 4 * server_mod.MAX_MESSAGES_PER_ROUND
    b.sock.send(GET_FEATURES)
    answered_a = 0
    rounds = 0
    while True:
        rounds += 1
        host.server.poll_once(0)
        answered_a += replies(a.sock)      # a greedy flooder that does read its replies
        if replies(b.sock):
            break
        assert rounds < 5, "B was not answered"
    handled_a_before_b = back_a.stats["messages"]
    assert rounds == 1
    assert handled_a_before_b <= server_mod.MAX_MESSAGES_PER_ROUND
    # ... and the flood is still served completely, a quota per round.
    while answered_a < queued:
        host.server.poll_once(0)
        answered_a += replies(a.sock)
        rounds += 1
    assert back_b.stats["messages"] == 1
    assert rounds >= queued // server_mod.MAX_MESSAGES_PER_ROUND


def test_a_front_end_that_never_reads_its_replies_is_dropped_not_waited_for(host, monkeypatch, caplog):
    monkeypatch.setattr(server_mod, "REPLY_TIMEOUT_S", 0.05)
    a, b, back_a, back_b = two_front_ends(host)
    conn_a = host.server.connections[0]
    conn_a.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)   # fills after a few replies
    queued = flood(a.sock, 5000)
    b.sock.send(GET_FEATURES)
    with caplog.at_level(logging.WARNING):
        for _ in range(queued // server_mod.MAX_MESSAGES_PER_ROUND + 2):
            host.server.poll_once(0)
            if conn_a not in host.server.connections:
                break
    assert conn_a not in host.server.connections
    assert any("cannot reply" in r.getMessage() for r in caplog.records)
    assert replies(b.sock) == 1
    # B keeps being served after A is gone.
    b.sock.send(GET_FEATURES)
    host.server.poll_once(0)
    assert replies(b.sock) == 1


def test_many_connection_attempts_cost_one_accept_per_round_and_leak_nothing(host, tmp_path):
    """A front-end that opens connection after connection to a VF's socket: the
    endpoint serves one front-end, refuses the others one accept per round, and
    another VF is answered in the first round; nothing is left open."""
    import os

    from ifcvf.vhost.backend import VhostBackend

    vf_a = host.add_vf(IfcvfConfig(queue_pairs=1))
    b = host.connect(host.add_vf(IfcvfConfig(queue_pairs=1)))
    path = str(tmp_path / "a.sock")
    host.server.add_endpoint(path, lambda: VhostBackend(vf_a.driver, name="a"))
    first = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    first.connect(path)
    host.server.poll_once(0)
    fds_before = len(os.listdir("/proc/self/fd"))
    attempts, connected = [], 0
    for _ in range(200):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(path)
            connected += 1
        except (BlockingIOError, ConnectionRefusedError):
            pass
        attempts.append(s)
    assert connected >= 1
    b.sock.send(GET_FEATURES)
    host.server.poll_once(0)
    assert replies(b.sock) == 1                      # B: answered in the first round
    for _ in range(connected + 2):
        host.server.poll_once(0)
    first.send(GET_FEATURES)                         # the VF's own front-end is still served
    host.server.poll_once(0)
    assert replies(first) == 1
    for s in attempts:
        s.close()
    first.close()
    host.server.poll_once(0)
    # The refused connections were closed by the server: nothing of theirs is left.
    assert len(os.listdir("/proc/self/fd")) <= fds_before
