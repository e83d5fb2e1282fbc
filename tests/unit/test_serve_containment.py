"""No exception in one connection's work ends `ifcvf serve` (DESIGN.md, "Bad input").

An unexpected exception (a bug in a handler, a failed allocation) is logged
with the connection's name and its traceback, that connection is closed (its
VF stopped), and every other connection keeps being served.  A config change
from the VF wakes the server loop at once.  Each test here failed before its
fix (issue 10).
"""
import logging
import select
import socket
import threading

import pytest

from hal.memory import HostMemory
from ifcvf.tools.runs.bringup import GUEST_FEATURES
from ifcvf.vring import split_ring_layout
from ifcvf.tools.runs.stack import SimHost
from ifcvf.vhost import protocol as p
from ifcvf.vhost.backend import HANDLERS, VhostBackend
from ifcvf.vhost.channel import MessageReader, send_message
from ifcvf.vhost.server import VhostServer
from sim.config import IfcvfConfig
from sim.frontend import FrontEnd, Region, RingAddresses
from test_serve import Served, frontend

R = p.Request
MiB = 1 << 20
LOG_200M = 6400


@pytest.fixture
def host():
    h = SimHost(seed=9)
    yield h
    h.close()


def running_vf(host, ram, name):
    """A VF serving a guest's two rings through its own connection."""
    vf = host.add_vf(IfcvfConfig(queue_pairs=1))
    fe = host.connect(vf, name=name)
    rings, base = [], 0x10_0000
    for q in range(2):
        desc, avail, used, base = split_ring_layout(base, 256)
        rings.append(RingAddresses(q, 256, desc, avail, used))
    fe.connect(2)
    fe.start(fe.features & (GUEST_FEATURES | 1 << p.F_PROTOCOL_FEATURES),
             [Region(0, ram.size, ram.fd, ram.address)], rings)
    assert vf.backend.configured and vf.driver.mode == "direct"
    return vf, fe


def closed_by_backend(fe) -> bool:
    ready, _, _ = select.select([fe.sock], [], [], 0)
    return bool(ready) and fe.sock.recv(1, socket.MSG_DONTWAIT) == b""


def raiser(error: BaseException):
    def handler(*args, **kwargs):
        raise error
    return handler


def assert_logged_with_traceback(caplog, name: str) -> None:
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and name in r.getMessage()]
    assert errors and errors[0].exc_info is not None, [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("error", [RuntimeError("injected"), KeyError("injected"),
                                   MemoryError(), ZeroDivisionError("injected")],
                         ids=lambda e: type(e).__name__)
def test_an_unexpected_exception_in_a_handler_costs_only_its_connection(host, ram, caplog, monkeypatch, error):
    victim_vf, victim = running_vf(host, ram, "victim")
    other_vf, other = running_vf(host, ram, "other")
    monkeypatch.setitem(HANDLERS, R.SET_LOG_BASE, raiser(error))
    log = HostMemory(4096, "log")
    try:
        with caplog.at_level(logging.ERROR):
            send_message(victim.sock, p.encode_request(R.SET_LOG_BASE, p.Log(512, 0)), [log.fd])
            victim.sock.sendall(p.encode_request(R.GET_FEATURES))   # read with it, never answered
            host.pump()
        assert_logged_with_traceback(caplog, "victim")
    finally:
        log.close()
    assert closed_by_backend(victim)
    assert victim_vf.backend not in [c.backend for c in host.server.connections]
    assert victim_vf.driver.mode == "stopped"          # closing the connection stopped its VF
    assert other.get_u64(R.GET_FEATURES) == other.features
    assert other_vf.driver.mode == "direct"


def test_a_handler_failing_while_the_vf_logs_costs_only_its_connection(host, ram, caplog, monkeypatch):
    """The issue's path: SET_VRING_ADDR(LOG) at migration start raising unexpectedly."""
    victim_vf, victim = running_vf(host, ram, "victim")
    other_vf, other = running_vf(host, ram, "other")
    monkeypatch.setitem(HANDLERS, R.SET_VRING_ADDR, raiser(RuntimeError("injected")))
    with caplog.at_level(logging.ERROR):
        raw_addr = p.VringAddr(0, p.VRING_F_LOG, ram.address, ram.address + 8192, ram.address + 4096, 0)
        send_message(victim.sock, p.encode_request(R.SET_VRING_ADDR, raw_addr, need_reply=True))
        host.pump()
    assert_logged_with_traceback(caplog, "victim")
    assert closed_by_backend(victim) and victim_vf.driver.mode == "stopped"
    assert other.get_u64(R.GET_FEATURES) == other.features
    assert other_vf.driver.mode == "direct"


def test_handle_turns_an_unexpected_exception_into_closing_without_a_reply(host, ram, monkeypatch):
    vf = host.add_vf(IfcvfConfig(queue_pairs=1))
    backend = VhostBackend(vf.driver, name="direct")
    monkeypatch.setitem(HANDLERS, R.GET_FEATURES, raiser(RuntimeError("injected")))
    frames = MessageReader().feed(p.encode_request(R.GET_FEATURES))
    outcome = backend.handle(frames[0])
    assert outcome.close and outcome.replies == []
    assert "GET_FEATURES" in backend.broken_reason
    backend.close()


@pytest.mark.parametrize("where", ["after_reply", "take_backend_requests", "backend_channel_lost"])
def test_failures_after_the_reply_cost_only_their_connection(host, ram, caplog, monkeypatch, where):
    victim_vf, victim = running_vf(host, ram, "victim")
    other_vf, other = running_vf(host, ram, "other")
    monkeypatch.setattr(victim_vf.backend, where, raiser(RuntimeError("injected")))
    with caplog.at_level(logging.ERROR):
        if where == "backend_channel_lost":
            victim.backend_channel.close()            # the front-end ends its back-end channel
            victim.backend_channel = None
            host.pump()
        else:
            victim.get_u64(R.GET_FEATURES)            # the reply goes out, then the failure
        host.pump()
    assert_logged_with_traceback(caplog, "victim")
    assert closed_by_backend(victim) and victim_vf.driver.mode == "stopped"
    assert other.get_u64(R.GET_FEATURES) == other.features
    assert other_vf.driver.mode == "direct"


def test_a_back_end_that_cannot_be_built_costs_only_that_connection(tmp_path, caplog):
    """The accept path: the front-end is disconnected, the socket keeps listening."""
    host = SimHost(seed=2)
    vf = host.add_vf(IfcvfConfig(queue_pairs=1))
    server = VhostServer()
    builds = []

    def make_backend():
        builds.append(1)
        if len(builds) == 1:
            raise RuntimeError("injected")
        return VhostBackend(vf.driver, name="second")

    path = str(tmp_path / "vf.sock")
    try:
        server.add_endpoint(path, make_backend)
        first = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        first.connect(path)
        with caplog.at_level(logging.ERROR):
            server.poll_once(0)
        assert_logged_with_traceback(caplog, path)
        assert first.recv(1) == b"" and server.connections == []
        second = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        second.connect(path)
        server.poll_once(0)                           # accepted
        assert len(server.connections) == 1
        fe = FrontEnd(second, pump=lambda: server.poll_once(0), timeout=5.0)
        assert fe.get_u64(R.GET_FEATURES)
        fe.close()
        first.close()
    finally:
        server.close()
        host.close()


def test_the_loop_goes_on_after_a_failure_of_its_own(monkeypatch, caplog):
    """serve_forever: a round that fails is logged, the next one runs."""
    server = VhostServer()
    rounds = []

    def after():
        rounds.append(1)
        if len(rounds) == 1:
            raise RuntimeError("injected")
        if len(rounds) == 3:
            server.stop()

    try:
        with caplog.at_level(logging.ERROR):
            server.serve_forever(timeout=0, after=after)
        assert len(rounds) == 3
        assert any(r.exc_info is not None for r in caplog.records if r.levelno == logging.ERROR)
    finally:
        server.close()


# --- config changes wake the loop -------------------------------------------------

def config_change_setup(host, ram):
    vf, fe = running_vf(host, ram, "cfg")
    fe.service_backend_channel()                      # whatever the set-up queued
    host.pump()
    assert fe.backend_channel is not None
    return vf, fe


def backend_messages(fe) -> list:
    before = len(fe.backend_requests)
    fe.service_backend_channel()
    return fe.backend_requests[before:]


def selected_kinds(server, monkeypatch) -> list:
    """Record which kinds of event each select() of the server returned."""
    kinds = []
    real = server.selector.select

    def select_(timeout=None):
        events = real(timeout)
        kinds.append([key.data[0] for key, _ in events])
        return events

    monkeypatch.setattr(server.selector, "select", select_)
    return kinds


def test_a_config_change_wakes_the_server_loop(host, ram, monkeypatch):
    vf, fe = config_change_setup(host, ram)
    kinds = selected_kinds(host.server, monkeypatch)
    vf.backend.config_changed()
    # The wake-up is already pending: the loop will not sleep its timeout.
    assert select.select([host.server._wake_r], [], [], 0)[0]
    host.server.poll_once(timeout=30)
    assert kinds == [["wake"]]
    assert [m.request for m in backend_messages(fe)] == [p.BackendRequest.CONFIG_CHANGE_MSG]


def test_a_config_change_from_another_thread_ends_a_long_poll(host, ram, monkeypatch):
    """The VFIO HAL runs the config-interrupt poller on its own thread."""
    vf, fe = config_change_setup(host, ram)
    polling = threading.Event()
    real = host.server.selector.select
    kinds = []

    def select_(timeout=None):
        polling.set()                                 # the change comes while the loop waits
        events = real(timeout)
        kinds.append([key.data[0] for key, _ in events])
        return events

    monkeypatch.setattr(host.server.selector, "select", select_)
    poller = threading.Thread(target=lambda: (polling.wait(30), vf.backend.config_changed()))
    poller.start()
    host.server.poll_once(timeout=30)
    poller.join(30)
    assert kinds == [["wake"]]                        # woken, not timed out
    assert [m.request for m in backend_messages(fe)] == [p.BackendRequest.CONFIG_CHANGE_MSG]


# --- the real process -------------------------------------------------------------

def test_serve_survives_a_6400_byte_log_and_keeps_every_vf_serving(tmp_path):
    """`ifcvf serve` with two simulated VFs: QEMU's exact log for -m 200M on A."""
    a, b = tmp_path / "a.sock", tmp_path / "b.sock"
    served = Served("--socket", str(a), "--device", "sim", "--socket", str(b), "--device", "sim")
    ram = HostMemory(200 * MiB, "guest")
    log = HostMemory(LOG_200M, "vhost-log")
    try:
        served.wait_for(f"serving sim on {b}")
        fe = frontend(a)
        fe.connect(2)
        fe.set_memory([Region(0, ram.size, ram.fd, ram.address)])
        fe.set_log_base(log.fd, LOG_200M)            # answered: LOG_SHMFD
        served.wait_for("dirty log of 6400 bytes mapped")
        assert served.proc.poll() is None
        assert fe.get_u64(R.GET_FEATURES) == fe.features
        other = frontend(b)
        assert other.get_u64(R.GET_FEATURES) >> p.F_LOG_ALL & 1
        other.close()
        fe.close()
        assert served.stop() == 0
    finally:
        served.stop()
        ram.close()
        log.close()


def test_a_vf_that_fails_to_stop_still_releases_the_connections_fds(host, ram, monkeypatch):
    """The ring eventfds, the memory table and the log belong to the connection,
    not to the VF: when stopping the VF raises, closing the back-end must still
    release them (otherwise each reconnect leaks the rings' kick and call fds)."""
    import os
    vf, fe = running_vf(host, ram, "stuck")
    backend = vf.backend
    fds = [fd for v in backend.vrings for fd in (v.kick_fd, v.call_fd) if fd >= 0]
    assert len(fds) == 4 and backend.memory is not None
    monkeypatch.setattr(vf.driver, "dev_close", raiser(RuntimeError("stop never acknowledged")))
    with pytest.raises(RuntimeError, match="never acknowledged"):
        backend.close()
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)
    assert backend.memory is None
    assert all(v.kick_fd == v.call_fd == -1 for v in backend.vrings)
