"""The vhost-user wire codec (ifcvf.vhost.protocol), without sockets."""
import ctypes
import os
import struct

import pytest

from ifcvf.vhost.protocol import (
    BACKEND_REQUEST_SPECS, F_LOG_ALL, F_PROTOCOL_FEATURES, MAX_PAYLOAD_SIZE, QEMU_7_2_PROTOCOL_FEATURES,
    QEMU_7_2_REQUESTS, REPLY_FLAGS, REQUEST_SPECS, U64, VIRTIO_F_IOMMU_PLATFORM, VRING_NOFD,
    BackendRequest, Config, DeviceStateTransfer, FdRule, Header, Inflight, Iotlb, IotlbPerm,
    IotlbType, Log, MemoryRegion, MemoryTable, ProtocolError, ProtocolFeature, Raw, ReplyAction,
    Request, SharedObject, SingleRegion, UnknownRequestError, VringAddr, VringArea, VringFd,
    VringState, decode_header, encode_ack, encode_backend_request, encode_failure_reply,
    encode_raw, encode_reply, encode_request, parse, parse_backend_request, parse_reply,
    protocol_mask, reply_action)

FAKE_FDS = (40, 41, 42, 43, 44, 45, 46, 47, 48, 49)   # parse only counts fds

GIB = 1 << 30
UVA = 0x7F12_3400_0000
RAM = MemoryRegion(0, 512 << 20, UVA, 0)
HIGH = MemoryRegion(4 * GIB, GIB, UVA + GIB, 0)

# One valid message per request, shaped as QEMU 7.2 (or the spec) sends it:
# (payload, fd count).
VALID = {
    Request.GET_FEATURES: (None, 0),
    Request.SET_FEATURES: (U64(0x1_7000_8000), 0),
    Request.SET_OWNER: (None, 0),
    Request.RESET_OWNER: (None, 0),
    Request.SET_MEM_TABLE: (MemoryTable((RAM, HIGH)), 2),
    Request.SET_LOG_BASE: (Log(0x4000, 0), 1),
    Request.SET_LOG_FD: (None, 1),
    Request.SET_VRING_NUM: (VringState(0, 256), 0),
    Request.SET_VRING_ADDR: (VringAddr(1, 0, UVA + 0x1000, UVA + 0x3000, UVA + 0x2000, 0x13000), 0),
    Request.SET_VRING_BASE: (VringState(1, 7), 0),
    Request.GET_VRING_BASE: (VringState(1, 0), 0),
    Request.SET_VRING_KICK: (VringFd(0), 1),
    Request.SET_VRING_CALL: (VringFd(1), 1),
    Request.SET_VRING_ERR: (VringFd(1, nofd=True), 0),
    Request.GET_PROTOCOL_FEATURES: (None, 0),
    Request.SET_PROTOCOL_FEATURES: (U64(0xF), 0),
    Request.GET_QUEUE_NUM: (None, 0),
    Request.SET_VRING_ENABLE: (VringState(0, 1), 0),
    Request.SEND_RARP: (U64(int.from_bytes(bytes.fromhex("525400123456") + bytes(2), "little")), 0),
    Request.NET_SET_MTU: (U64(1500), 0),
    Request.SET_BACKEND_REQ_FD: (None, 1),
    Request.IOTLB_MSG: (Iotlb(0x1000, 0x1000, UVA, IotlbPerm.RW, IotlbType.UPDATE), 0),
    Request.SET_VRING_ENDIAN: (VringState(0, 1), 0),
    Request.GET_CONFIG: (Config(0, 0, bytes(12)), 0),
    Request.SET_CONFIG: (Config(0, 1, bytes.fromhex("525400123456")), 0),
    Request.CREATE_CRYPTO_SESSION: (Raw(bytes(632)), 0),
    Request.CLOSE_CRYPTO_SESSION: (U64(3), 0),
    Request.POSTCOPY_ADVISE: (None, 0),
    Request.POSTCOPY_LISTEN: (None, 0),
    Request.POSTCOPY_END: (None, 0),
    Request.GET_INFLIGHT_FD: (Inflight(0, 0, 2, 256), 0),
    Request.SET_INFLIGHT_FD: (Inflight(0x3000, 0, 2, 256), 1),
    Request.GPU_SET_SOCKET: (None, 1),
    Request.RESET_DEVICE: (None, 0),
    Request.VRING_KICK: (VringState(0, 0), 0),
    Request.GET_MAX_MEM_SLOTS: (None, 0),
    Request.ADD_MEM_REG: (SingleRegion(HIGH), 1),
    Request.REM_MEM_REG: (SingleRegion(HIGH), 0),
    Request.SET_STATUS: (U64(0xF), 0),
    Request.GET_STATUS: (None, 0),
    Request.GET_SHARED_OBJECT: (SharedObject(bytes(range(16))), 0),
    Request.SET_DEVICE_STATE_FD: (DeviceStateTransfer(0, 0), 1),
    Request.CHECK_DEVICE_STATE: (None, 0),
    Request.GET_SHMEM_CONFIG: (None, 0),
}
ALL_REQUESTS = sorted(Request)


def split(data: bytes) -> tuple[Header, bytes]:
    return decode_header(data[:12]), data[12:]


def parse_bytes(data: bytes, nfds: int = 0):
    header, payload = split(data)
    return parse(header, payload, FAKE_FDS[:nfds])


def payload_bytes(request: Request) -> bytes:
    payload, _ = VALID[request]
    return payload.pack() if payload is not None else b""


def parse_raw(request: int, payload: bytes, nfds: int = 0, flags: int = 1):
    return parse(Header(request, flags, len(payload)), payload, FAKE_FDS[:nfds])


# --- numbers ------------------------------------------------------------------

def test_request_numbers_cover_the_spec():
    assert [int(r) for r in Request] == list(range(1, 45))
    assert Request.SET_BACKEND_REQ_FD == 21 and Request.SET_STATUS == 39
    assert Request.GET_STATUS == 40 and Request.GET_SHMEM_CONFIG == 44
    assert [int(r) for r in BackendRequest] == list(range(1, 11))
    assert BackendRequest.VRING_HOST_NOTIFIER_MSG == 3
    assert [int(f) for f in ProtocolFeature] == list(range(22))
    assert ProtocolFeature.STATUS == 16 and ProtocolFeature.REPLY_ACK.mask == 0x8


def test_qemu_7_2_sends_1_to_40_except_35():
    assert {int(r) for r in QEMU_7_2_REQUESTS} == set(range(1, 41)) - {35}
    assert Request.GET_STATUS.sent_by_qemu_7_2 and not Request.VRING_KICK.sent_by_qemu_7_2
    assert not Request.GET_SHARED_OBJECT.sent_by_qemu_7_2
    # Protocol features 0-13, 15, 16: INBAND_NOTIFICATIONS (14) was never implemented.
    assert QEMU_7_2_PROTOCOL_FEATURES == 0x1BFFF
    assert protocol_mask(ProtocolFeature.MQ, ProtocolFeature.LOG_SHMFD, ProtocolFeature.RARP,
                         ProtocolFeature.REPLY_ACK) == 0xF   # the stub's answer in real-peers §3


def test_feature_constants():
    assert F_PROTOCOL_FEATURES == 30 and F_LOG_ALL == 26 and VRING_NOFD == 0x100
    assert REPLY_FLAGS == 0x5
    # QEMU's SET_FEATURES with LOG_ALL from the migration trace
    assert 0x1_7400_8000 >> F_LOG_ALL & 1 and not 0x1_7000_8000 >> F_LOG_ALL & 1


def test_max_payload_is_qemu_7_2_vhostuserpayload():
    """Rebuild QEMU 7.2's VhostUserPayload union with ctypes: its size is the
    largest reply QEMU accepts (the crypto session dominates)."""
    class SymSessionInfo(ctypes.Structure):   # include/sysemu/cryptodev.h, 7.1+
        _fields_ = [("cipher_alg", ctypes.c_uint32), ("key_len", ctypes.c_uint32),
                    ("hash_alg", ctypes.c_uint32), ("hash_result_len", ctypes.c_uint32),
                    ("auth_key_len", ctypes.c_uint32), ("add_len", ctypes.c_uint32),
                    ("op_type", ctypes.c_uint8), ("direction", ctypes.c_uint8),
                    ("hash_mode", ctypes.c_uint8), ("alg_chain_order", ctypes.c_uint8),
                    ("cipher_key", ctypes.c_void_p), ("auth_key", ctypes.c_void_p)]

    class CryptoSession(ctypes.Structure):
        _fields_ = [("session_id", ctypes.c_int64), ("setup", SymSessionInfo),
                    ("key", ctypes.c_uint8 * 64), ("auth_key", ctypes.c_uint8 * 512)]

    class Payload(ctypes.Union):
        _fields_ = [("memory", ctypes.c_uint8 * (8 + 8 * 32)),
                    ("config", ctypes.c_uint8 * (12 + 256)),
                    ("session", CryptoSession), ("inflight", ctypes.c_uint64 * 3)]

    assert ctypes.sizeof(Payload) == MAX_PAYLOAD_SIZE == 632


# --- every request: valid form, size, fds -----------------------------------

@pytest.mark.parametrize("request_", ALL_REQUESTS, ids=lambda r: r.name)
def test_valid_request_parses_to_its_payload(request_):
    payload, nfds = VALID[request_]
    message = parse_bytes(encode_request(request_, payload), nfds)
    assert message.request is request_
    assert message.payload == payload
    assert message.flags == 1 and not message.need_reply
    if request_ is Request.REM_MEM_REG:
        assert message.fds == () and message.stray_fds == ()
    else:
        assert message.fds == FAKE_FDS[:nfds]


@pytest.mark.parametrize("request_", ALL_REQUESTS, ids=lambda r: r.name)
def test_one_byte_too_many_is_refused(request_):
    data = payload_bytes(request_) + b"\0"
    with pytest.raises(ProtocolError, match=f"^{request_.name}: .*") as info:
        parse_raw(request_, data, VALID[request_][1])
    assert info.value.request is request_


@pytest.mark.parametrize("request_", [r for r in ALL_REQUESTS if payload_bytes(r)],
                         ids=lambda r: r.name)
def test_one_byte_short_is_refused(request_):
    with pytest.raises(ProtocolError, match=f"^{request_.name}: "):
        parse_raw(request_, payload_bytes(request_)[:-1], VALID[request_][1])


@pytest.mark.parametrize("request_", ALL_REQUESTS, ids=lambda r: r.name)
def test_fd_counts_off_by_one_are_refused(request_):
    payload, nfds = VALID[request_]
    data = payload_bytes(request_)
    with pytest.raises(ProtocolError, match="fds attached, expected"):
        parse_raw(request_, data, nfds + 1 if request_ is not Request.REM_MEM_REG else 2)
    if nfds:
        with pytest.raises(ProtocolError, match=f"{request_.name}: {nfds - 1} fds attached"):
            parse_raw(request_, data, nfds - 1)


def test_fd_rules_follow_the_spec():
    rules = {request: spec.fds for request, spec in REQUEST_SPECS.items()}
    assert rules[Request.SET_MEM_TABLE] is FdRule.PER_REGION
    assert rules[Request.SET_LOG_BASE] is FdRule.ONE
    assert rules[Request.ADD_MEM_REG] is FdRule.ONE
    assert rules[Request.REM_MEM_REG] is FdRule.STRAY_TOLERATED
    for request in (Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR):
        assert rules[request] is FdRule.UNLESS_NOFD
    carriers = {Request.SET_MEM_TABLE, Request.SET_LOG_BASE, Request.SET_LOG_FD,
                Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR,
                Request.SET_BACKEND_REQ_FD, Request.SET_INFLIGHT_FD, Request.GPU_SET_SOCKET,
                Request.ADD_MEM_REG, Request.REM_MEM_REG, Request.SET_DEVICE_STATE_FD}
    assert {r for r, rule in rules.items() if rule is not FdRule.NONE} == carriers


def test_get_requests_always_have_a_reply():
    for request, spec in REQUEST_SPECS.items():
        if request.name.startswith("GET_"):
            assert spec.has_reply, request
    with_reply = {r for r, spec in REQUEST_SPECS.items() if spec.has_reply and r.sent_by_qemu_7_2}
    assert with_reply - {r for r in with_reply if r.name.startswith("GET_")} == {
        Request.SET_LOG_BASE, Request.IOTLB_MSG, Request.CREATE_CRYPTO_SESSION,
        Request.POSTCOPY_ADVISE, Request.POSTCOPY_END}


# --- flags and codes ----------------------------------------------------------

@pytest.mark.parametrize("flags, reason", [
    (0x0, "version 0, expected 1"), (0x2, "version 2"), (0x3, "version 3"),
    (0x5, r"set REPLY \(0x4\) on a request"), (0x11, "undefined bits 0x10"),
    (0x8000_0001, "undefined bits 0x80000000")])
def test_bad_flags_are_refused(flags, reason):
    with pytest.raises(ProtocolError, match=f"SET_VRING_NUM: flags .*{reason}"):
        parse_raw(Request.SET_VRING_NUM, VringState(0, 256).pack(), flags=flags)


def test_need_reply_is_reported():
    message = parse_bytes(encode_request(Request.SET_FEATURES, U64(1 << 26), need_reply=True))
    assert message.flags == 0x9 and message.need_reply


@pytest.mark.parametrize("code", [0, 45, 1000, 0xFFFF_FFFF])
def test_unknown_codes_carry_the_code(code):
    with pytest.raises(UnknownRequestError) as info:
        parse_raw(code, b"", flags=0x9)
    assert isinstance(info.value, ProtocolError)
    assert info.value.code == code and info.value.header.need_reply
    assert f"code {code}" in str(info.value)


def test_size_field_must_match_the_payload_given():
    with pytest.raises(ProtocolError, match="SET_VRING_NUM: header says 8 payload bytes, 4 given"):
        parse(Header(Request.SET_VRING_NUM, 1, 8), bytes(4))


def test_decode_header_refuses_short_and_oversized():
    with pytest.raises(ProtocolError, match="header is 11 bytes, expected 12"):
        decode_header(bytes(11))
    header = decode_header(struct.pack("=III", 5, 1, MAX_PAYLOAD_SIZE))
    assert header.size == MAX_PAYLOAD_SIZE
    with pytest.raises(ProtocolError, match="payload size 633 exceeds the maximum 632"):
        decode_header(struct.pack("=III", 5, 1, MAX_PAYLOAD_SIZE + 1))


# --- memory tables --------------------------------------------------------------

def table_bytes(regions, nregions=None):
    return struct.pack("=II", len(regions) if nregions is None else nregions, 0) + b"".join(
        r.pack() for r in regions)


def test_memory_table_is_nregions_long_as_qemu_sends_it():
    # One region (the real-peers trace): 8 + 32 bytes, not QEMU's 8-slot C struct.
    assert len(encode_request(Request.SET_MEM_TABLE, MemoryTable((RAM,)))) == 12 + 40
    full = table_bytes([RAM]) + bytes(7 * 32)
    with pytest.raises(ProtocolError, match=r"SET_MEM_TABLE: memory table is 264 bytes, "
                                            r"expected 8 \+ 1 \* 32 = 40"):
        parse_raw(Request.SET_MEM_TABLE, full, 1)


def test_memory_table_with_eight_regions_and_eight_fds():
    regions = tuple(MemoryRegion(i * GIB, GIB, UVA + i * GIB, 0) for i in range(8))
    message = parse_raw(Request.SET_MEM_TABLE, table_bytes(regions), 8)
    assert message.payload.regions == regions and message.fds == FAKE_FDS[:8]


@pytest.mark.parametrize("regions, nregions, reason", [
    ([], 0, "nregions is 0"),
    ([RAM] * 9, 9, "nregions is 9, at most 8 allowed"),
    ([RAM], 2, r"memory table is 40 bytes, expected 8 \+ 2 \* 32 = 72"),
    ([MemoryRegion(0, 0, UVA, 0)], None, "region 0: memory_size is 0"),
    ([RAM, MemoryRegion(2**64 - GIB, GIB, UVA, 0)], None,
     "region 1: guest_phys_addr 0xffffffffc0000000 \\+ memory_size 0x40000000 overflows 64 bits"),
    ([MemoryRegion(0, GIB, 2**64 - 1, 0)], None, "region 0: userspace_addr .* overflows"),
    ([MemoryRegion(0, GIB, UVA, 2**64 - GIB)], None, "region 0: mmap_offset .* overflows"),
    ([RAM, MemoryRegion(RAM.memory_size - 0x1000, GIB, UVA + GIB, 0)], None,
     "regions 0 and 1 overlap in guest-physical space"),
    ([HIGH, RAM, HIGH], None, "regions 0 and 2 overlap"),
    ([MemoryRegion(0, 4 * GIB, UVA, 0), MemoryRegion(GIB, 0x1000, UVA, 0)], None,
     "regions 0 and 1 overlap"),
])
def test_bad_memory_tables(regions, nregions, reason):
    with pytest.raises(ProtocolError, match=f"SET_MEM_TABLE: {reason}"):
        parse_raw(Request.SET_MEM_TABLE, table_bytes(regions, nregions), len(regions))


def test_adjacent_regions_do_not_overlap():
    below = MemoryRegion(0, GIB, UVA, 0)
    above = MemoryRegion(GIB, GIB, UVA + GIB, 0)
    assert parse_raw(Request.SET_MEM_TABLE, table_bytes([above, below]), 2).payload.regions == (
        above, below)


def test_memory_table_needs_one_fd_per_region():
    with pytest.raises(ProtocolError, match="SET_MEM_TABLE: 1 fds attached, expected exactly one "
                                            "fd per region .*: 2 here"):
        parse_raw(Request.SET_MEM_TABLE, table_bytes([RAM, HIGH]), 1)


@pytest.mark.parametrize("request_", [Request.ADD_MEM_REG, Request.REM_MEM_REG],
                         ids=lambda r: r.name)
def test_single_region_is_validated(request_):
    empty = SingleRegion(MemoryRegion(GIB, 0, UVA, 0)).pack()
    with pytest.raises(ProtocolError, match=f"{request_.name}: memory_size is 0"):
        parse_raw(request_, empty, 1 if request_ is Request.ADD_MEM_REG else 0)


def test_rem_mem_reg_tolerates_one_fd_as_stray():
    message = parse_raw(Request.REM_MEM_REG, SingleRegion(HIGH).pack(), 1)
    assert message.fds == () and message.stray_fds == FAKE_FDS[:1]


# --- per-request payload rules ---------------------------------------------------

@pytest.mark.parametrize("request_, num", [(Request.SET_VRING_ENABLE, 2),
                                            (Request.SET_VRING_ENDIAN, 7),
                                            (Request.VRING_KICK, 1)])
def test_vring_state_num_rules(request_, num):
    with pytest.raises(ProtocolError, match=f"{request_.name}: vring 3 num is {num}, .*expected"):
        parse_raw(request_, VringState(3, num).pack())


def test_vring_enable_accepts_both_values():
    assert parse_raw(Request.SET_VRING_ENABLE, VringState(1, 0).pack()).payload == VringState(1, 0)


@pytest.mark.parametrize("request_", [Request.SET_VRING_KICK, Request.SET_VRING_CALL,
                                      Request.SET_VRING_ERR], ids=lambda r: r.name)
def test_vring_fd_requests(request_):
    assert parse_raw(request_, U64(255).pack(), 1).payload == VringFd(255)
    assert parse_raw(request_, U64(0x105).pack(), 0).payload == VringFd(5, nofd=True)
    with pytest.raises(ProtocolError, match=f"{request_.name}: 1 fds attached, .*: 0 here"):
        parse_raw(request_, U64(0x105).pack(), 1)
    with pytest.raises(ProtocolError, match=f"{request_.name}: 0 fds attached, .*: 1 here"):
        parse_raw(request_, U64(5).pack(), 0)
    with pytest.raises(ProtocolError, match=f"{request_.name}: vring u64 0x205 sets reserved bits 0x200"):
        parse_raw(request_, U64(0x205).pack(), 1)


def test_vring_addr_flags():
    logged = VringAddr(0, 1, UVA, UVA + 0x2000, UVA + 0x1000, 0x12000)
    assert parse_raw(Request.SET_VRING_ADDR, logged.pack()).payload.log_enabled
    with pytest.raises(ProtocolError, match="SET_VRING_ADDR: vring flags 0x3 set undefined bits"):
        parse_raw(Request.SET_VRING_ADDR, VringAddr(0, 3, 0, 0, 0, 0).pack())


def test_vring_addr_wire_order_is_desc_used_avail_log():
    raw = struct.pack("=IIQQQQ", 2, 0, 0x1000, 0x3000, 0x2000, 0x9000)
    assert parse_raw(Request.SET_VRING_ADDR, raw).payload == VringAddr(2, 0, 0x1000, 0x3000, 0x2000,
                                                                       0x9000)


@pytest.mark.parametrize("log, reason", [(Log(0, 0), "log mmap_size is 0"),
                                         (Log(0x4000, 2**64 - 0x1000),
                                          "log mmap_offset 0xfffffffffffff000 .* overflows 64 bits")])
def test_bad_log(log, reason):
    with pytest.raises(ProtocolError, match=f"SET_LOG_BASE: {reason}"):
        parse_raw(Request.SET_LOG_BASE, log.pack(), 1)


def test_log_base_needs_its_memfd():
    with pytest.raises(ProtocolError, match="SET_LOG_BASE: 0 fds attached, expected exactly 1 fd"):
        parse_raw(Request.SET_LOG_BASE, Log(0x4000, 0).pack(), 0)


@pytest.mark.parametrize("raw, reason", [
    (struct.pack("=III", 0, 257, 0) + bytes(257), "config size 257 exceeds the 256-byte maximum"),
    (struct.pack("=III", 250, 8, 0) + bytes(8), "config offset 250 \\+ size 8 runs past"),
    (struct.pack("=III", 0, 8, 0) + bytes(6), "config payload is 18 bytes, expected 12 \\+ size 8 = 20"),
    (struct.pack("=III", 0, 4, 2) + bytes(4), "config flags 2 undefined"),
    (bytes(8), "config payload is 8 bytes, shorter than its 12-byte offset/size/flags head"),
])
def test_bad_config(raw, reason):
    with pytest.raises(ProtocolError, match=f"SET_CONFIG: {reason}"):
        parse_raw(Request.SET_CONFIG, raw)


def test_config_round_trips_with_its_size():
    config = parse_raw(Request.GET_CONFIG, struct.pack("=III", 0, 6, 0) + bytes(6)).payload
    assert config == Config(0, 0, bytes(6)) and config.size == 6


def test_status_must_fit_a_byte():
    assert parse_raw(Request.SET_STATUS, U64(0xFF).pack()).payload == U64(0xFF)
    with pytest.raises(ProtocolError, match="SET_STATUS: device status 0x100 does not fit"):
        parse_raw(Request.SET_STATUS, U64(0x100).pack())


@pytest.mark.parametrize("iotlb, reason", [
    (Iotlb(0, 0x1000, UVA, 4, 2), "IOTLB perm 4 undefined"),
    (Iotlb(0, 0x1000, UVA, 3, 0), "IOTLB type 0 undefined"),
    (Iotlb(0, 0x1000, UVA, 3, 5), "IOTLB type 5 undefined"),
    (Iotlb(2**64 - 0x1000, 0x2000, UVA, 3, 2), "IOTLB iova 0xfffffffffffff000 .* overflows")])
def test_bad_iotlb(iotlb, reason):
    with pytest.raises(ProtocolError, match=f"IOTLB_MSG: {reason}"):
        parse_raw(Request.IOTLB_MSG, iotlb.pack())


def test_iotlb_is_32_bytes_with_tail_padding():
    assert len(Iotlb(1, 2, 3, 3, 2).pack()) == 32
    assert len(Inflight(1, 2, 3, 4).pack()) == 24


def test_device_state_transfer_values():
    with pytest.raises(ProtocolError, match="transfer direction 2 undefined"):
        parse_raw(Request.SET_DEVICE_STATE_FD, struct.pack("=II", 2, 0), 1)
    with pytest.raises(ProtocolError, match="transfer phase 1 undefined"):
        parse_raw(Request.SET_DEVICE_STATE_FD, struct.pack("=II", 0, 1), 1)


# --- encoders -------------------------------------------------------------------------

@pytest.mark.parametrize("request_", [Request.GET_FEATURES, Request.GET_VRING_BASE,
                                      Request.SET_LOG_BASE, Request.GET_STATUS],
                         ids=lambda r: r.name)
def test_replies_carry_exactly_version_and_reply(request_):
    body = {Request.GET_FEATURES: U64(1 << 30), Request.GET_VRING_BASE: VringState(0, 42),
            Request.SET_LOG_BASE: None, Request.GET_STATUS: U64(0xF)}[request_]
    data = encode_reply(request_, body)
    request, flags, size = struct.unpack_from("=III", data)
    assert (request, flags) == (request_, 0x5)
    assert size == len(data) - 12 == (len(body.pack()) if body else 0)


def test_acks():
    assert encode_ack(Request.SET_FEATURES, True) == struct.pack("=IIIQ", 2, 5, 8, 0)
    assert encode_ack(Request.SET_FEATURES, False) == struct.pack("=IIIQ", 2, 5, 8, 1)
    assert encode_ack(Request.SET_MEM_TABLE, 0) == struct.pack("=IIIQ", 5, 5, 8, 0)
    assert encode_ack(Request.SET_MEM_TABLE, 22) == struct.pack("=IIIQ", 5, 5, 8, 22)
    assert encode_ack(BackendRequest.VRING_HOST_NOTIFIER_MSG, True) == struct.pack("=IIIQ", 3, 5, 8, 0)


def test_failure_replies():
    assert encode_failure_reply(Request.GET_CONFIG) == struct.pack("=III", 24, 5, 0)
    assert encode_failure_reply(Request.IOTLB_MSG) == struct.pack("=IIIQ", 22, 5, 8, 1)
    with pytest.raises(ValueError, match="GET_FEATURES has no reply that can say it failed"):
        encode_failure_reply(Request.GET_FEATURES)
    with pytest.raises(ValueError):
        encode_failure_reply(Request.SET_VRING_NUM)


def test_encode_request_checks_the_payload_type():
    assert encode_request(Request.GET_FEATURES) == struct.pack("=III", 1, 1, 0)
    assert encode_request(Request.SET_OWNER, need_reply=True) == struct.pack("=III", 3, 9, 0)
    with pytest.raises(ValueError, match="SET_VRING_NUM takes VringState, not U64"):
        encode_request(Request.SET_VRING_NUM, U64(256))
    with pytest.raises(ValueError, match="takes no payload"):
        encode_request(Request.GET_FEATURES, U64(0))
    with pytest.raises(ValueError, match="exceeds the maximum 632"):
        encode_request(Request.SET_CONFIG, bytes(700))
    # raw bytes are the escape hatch for sending bad messages on purpose
    assert encode_request(Request.SET_VRING_NUM, b"\1\2") == struct.pack("=III", 8, 1, 2) + b"\1\2"


def test_encode_raw_can_lie_about_the_size():
    assert encode_raw(5, 0x1, b"ab", size=100) == struct.pack("=III", 5, 1, 100) + b"ab"


def test_pack_refuses_out_of_range_fields():
    with pytest.raises(ValueError, match="VringState field out of range"):
        VringState(2**32, 0).pack()
    with pytest.raises(ValueError, match="vring index 256 does not fit"):
        VringFd(256).pack()


# --- replies, parsed as QEMU 7.2 parses them --------------------------------------------

def test_parse_reply_round_trips():
    reply = parse_reply(*split(encode_reply(Request.GET_VRING_BASE, VringState(1, 42))),
                        Request.GET_VRING_BASE)
    assert reply.payload == VringState(1, 42) and not reply.failed
    features = parse_reply(*split(encode_reply(Request.GET_FEATURES, U64(0))), Request.GET_FEATURES)
    assert features.payload == U64(0) and not features.failed   # a value, not a status
    ack = parse_reply(*split(encode_ack(Request.SET_MEM_TABLE, False)), Request.SET_MEM_TABLE)
    assert ack.payload == U64(1) and ack.failed
    config = parse_reply(*split(encode_failure_reply(Request.GET_CONFIG)), Request.GET_CONFIG)
    assert config.payload is None and config.failed
    log = parse_reply(*split(encode_reply(Request.SET_LOG_BASE)), Request.SET_LOG_BASE)
    assert log.payload is None and not log.failed


def test_parse_reply_accepts_any_set_log_base_body():
    # rust-vmm echoes the 16-byte log; QEMU checks only the request code.
    echoed = encode_raw(Request.SET_LOG_BASE, 0x5, Log(0x4000, 0).pack())
    assert parse_reply(*split(echoed), Request.SET_LOG_BASE).payload == Raw(Log(0x4000, 0).pack())


@pytest.mark.parametrize("flags", [0x1, 0x4, 0xD, 0x7, 0x15])
def test_parse_reply_requires_exactly_0x5(flags):
    with pytest.raises(ProtocolError, match=f"reply flags are {flags:#x}, must be exactly"):
        parse_reply(*split(encode_raw(Request.GET_FEATURES, flags, U64(0).pack())),
                    Request.GET_FEATURES)


def test_parse_reply_requires_the_request_code():
    # RHBZ 2155173: "Received unexpected msg type. Expected 22 received 40".
    with pytest.raises(ProtocolError, match=r"IOTLB_MSG: reply carries code 40 \(GET_STATUS\), "
                                            r"expected the request's own code 22"):
        parse_reply(*split(encode_reply(Request.GET_STATUS, U64(0xF))), Request.IOTLB_MSG)


def test_parse_reply_checks_body_size():
    with pytest.raises(ProtocolError, match="GET_FEATURES: reply body is 4 bytes, expected 8"):
        parse_reply(*split(encode_raw(Request.GET_FEATURES, 0x5, bytes(4))), Request.GET_FEATURES)
    with pytest.raises(ProtocolError, match="SET_VRING_NUM: reply body is 0 bytes, expected 8"):
        parse_reply(*split(encode_raw(Request.SET_VRING_NUM, 0x5)), Request.SET_VRING_NUM)


def test_parse_reply_fds():
    inflight = encode_reply(Request.GET_INFLIGHT_FD, Inflight(0x3000, 0, 2, 256))
    assert parse_reply(*split(inflight), Request.GET_INFLIGHT_FD, [7]).fds == (7,)
    with pytest.raises(ProtocolError, match="0 fds attached to the reply, expected exactly 1 fd"):
        parse_reply(*split(inflight), Request.GET_INFLIGHT_FD)
    with pytest.raises(ProtocolError, match="1 fds attached to the reply, expected no fd"):
        parse_reply(*split(encode_ack(Request.SET_OWNER, True)), Request.SET_OWNER, [7])


# --- back-end -> front-end ----------------------------------------------------------------

def test_host_notifier_request():
    area = VringArea(1, 0x1000, 0x3004)
    data = encode_backend_request(BackendRequest.VRING_HOST_NOTIFIER_MSG, area, need_reply=True)
    assert struct.unpack_from("=III", data) == (3, 0x9, 24)
    message = parse_backend_request(*split(data), [9])
    assert message.payload == area and message.need_reply and message.fds == (9,)
    gone = encode_backend_request(BackendRequest.VRING_HOST_NOTIFIER_MSG,
                                  VringArea(1, 0, 0, nofd=True))
    assert struct.unpack_from("=Q", gone, 12) == (0x101,)
    assert parse_backend_request(*split(gone)).payload.nofd
    with pytest.raises(ProtocolError, match="BACKEND_VRING_HOST_NOTIFIER_MSG: 0 fds attached"):
        parse_backend_request(*split(data))


def test_config_change_and_unknown_backend_codes():
    data = encode_backend_request(BackendRequest.CONFIG_CHANGE_MSG, need_reply=True)
    assert parse_backend_request(*split(data)).request is BackendRequest.CONFIG_CHANGE_MSG
    with pytest.raises(UnknownRequestError) as info:
        parse_backend_request(Header(11, 1, 0), b"")
    assert info.value.code == 11
    with pytest.raises(ProtocolError, match="REPLY"):
        parse_backend_request(Header(2, 5, 0), b"")


def test_front_end_ack_to_a_backend_request():
    ack = encode_ack(BackendRequest.VRING_HOST_NOTIFIER_MSG, False)
    reply = parse_reply(*split(ack), BackendRequest.VRING_HOST_NOTIFIER_MSG)
    assert reply.failed and reply.payload == U64(1)
    assert not BACKEND_REQUEST_SPECS[BackendRequest.VRING_HOST_NOTIFIER_MSG].has_reply


# --- reply policy --------------------------------------------------------------------

V, NEED = 0x1, 0x9
A = ReplyAction


@pytest.mark.parametrize("request_, flags, reply_ack, ok, log_shmfd, action", [
    # the request's own reply, never a second ack
    (Request.GET_FEATURES, V, False, True, True, A.BODY),
    (Request.GET_FEATURES, NEED, True, True, True, A.BODY),
    (Request.GET_VRING_BASE, NEED, True, True, True, A.BODY),
    (Request.IOTLB_MSG, NEED, False, True, True, A.BODY),
    # acks only with REPLY_ACK negotiated and NEED_REPLY set
    (Request.SET_MEM_TABLE, NEED, True, True, True, A.ACK_SUCCESS),
    (Request.SET_MEM_TABLE, NEED, True, False, True, A.ACK_FAILURE),
    (Request.SET_MEM_TABLE, NEED, False, True, True, A.NOTHING),
    (Request.SET_MEM_TABLE, V, True, True, True, A.NOTHING),
    (Request.SET_VRING_NUM, V, True, False, True, A.NOTHING),
    (Request.SET_BACKEND_REQ_FD, NEED, True, True, True, A.ACK_SUCCESS),
    # SET_LOG_BASE replies (empty body) only with LOG_SHMFD
    (Request.SET_LOG_BASE, V, False, True, True, A.BODY),
    (Request.SET_LOG_BASE, V, True, True, False, A.NOTHING),
    (Request.SET_LOG_BASE, NEED, True, False, False, A.ACK_FAILURE),
    (Request.SET_LOG_BASE, V, True, False, True, A.CLOSE),
    # failures of requests with an explicit reply
    (Request.GET_CONFIG, V, True, False, True, A.FAILURE_BODY),
    (Request.IOTLB_MSG, NEED, True, False, True, A.FAILURE_BODY),
    (Request.POSTCOPY_END, V, False, False, True, A.FAILURE_BODY),
    (Request.GET_QUEUE_NUM, NEED, True, False, True, A.CLOSE),
    (Request.GET_PROTOCOL_FEATURES, V, False, False, True, A.CLOSE),
    # unknown codes
    (99, NEED, True, False, True, A.ACK_FAILURE),
    (99, NEED, False, False, True, A.CLOSE),
    (99, V, True, False, True, A.CLOSE),
    # headers that break the rules
    (Request.SET_VRING_NUM, 0x5, True, False, True, A.CLOSE),
    (Request.SET_VRING_NUM, 0xA, True, False, True, A.CLOSE),
    (Request.SET_VRING_NUM, 0x19, True, False, True, A.CLOSE),
])
def test_reply_policy(request_, flags, reply_ack, ok, log_shmfd, action):
    assert reply_action(request_, flags, reply_ack=reply_ack, ok=ok, log_shmfd=log_shmfd) is action


@pytest.mark.parametrize("request_", ALL_REQUESTS, ids=lambda r: r.name)
def test_success_replies_follow_the_table(request_):
    has_reply = REQUEST_SPECS[request_].has_reply
    got = reply_action(request_, NEED, reply_ack=True)
    assert got is (A.BODY if has_reply else A.ACK_SUCCESS)
    assert reply_action(request_, V, reply_ack=True) is (A.BODY if has_reply else A.NOTHING)


# --- gates ---------------------------------------------------------------------------

OFFER = 1 << F_PROTOCOL_FEATURES


@pytest.mark.parametrize("request_, offered, protocol, acked, allowed", [
    (Request.GET_FEATURES, 0, 0, 0, True),
    (Request.GET_PROTOCOL_FEATURES, 0, 0, 0, False),
    (Request.GET_PROTOCOL_FEATURES, OFFER, 0, 0, True),
    (Request.SET_VRING_ENABLE, OFFER, 0, 0, True),       # QEMU sends it before SET_FEATURES
    (Request.SET_VRING_ENABLE, 0, 0, 0, False),
    (Request.GET_QUEUE_NUM, OFFER, 0, 0, False),
    (Request.GET_QUEUE_NUM, OFFER, ProtocolFeature.MQ.mask, 0, True),
    (Request.GET_QUEUE_NUM, 0, ProtocolFeature.MQ.mask, 0, False),
    (Request.SET_STATUS, OFFER, ProtocolFeature.STATUS.mask, 0, True),
    (Request.GET_STATUS, OFFER, ProtocolFeature.MQ.mask, 0, False),
    (Request.SET_LOG_BASE, OFFER, ProtocolFeature.LOG_SHMFD.mask, 0, True),
    (Request.SET_BACKEND_REQ_FD, OFFER, ProtocolFeature.BACKEND_REQ.mask, 0, True),
    (Request.IOTLB_MSG, OFFER, 0, 1 << VIRTIO_F_IOMMU_PLATFORM, True),
    (Request.IOTLB_MSG, OFFER, 0, 0, False),
])
def test_gates(request_, offered, protocol, acked, allowed):
    gate = REQUEST_SPECS[request_].gate
    assert gate.allows(offered_features=offered, acked_protocol_features=protocol,
                       acked_features=acked) is allowed
    assert gate.describe()


# --- a QEMU 7.2 session, as traced in real-peers §3 -----------------------------------

def test_qemu_connect_and_migrate_trace_parses():
    kick, call = 60, 61
    trace = [
        (encode_request(Request.GET_FEATURES), ()),
        (encode_request(Request.GET_PROTOCOL_FEATURES), ()),
        (encode_request(Request.SET_PROTOCOL_FEATURES, U64(0xF)), ()),
        (encode_request(Request.GET_QUEUE_NUM), ()),
        (encode_request(Request.SET_OWNER), ()),
        (encode_request(Request.SET_VRING_CALL, VringFd(0)), (call,)),
        (encode_request(Request.SET_VRING_ERR, VringFd(0)), (call,)),
        (encode_request(Request.SET_VRING_ENABLE, VringState(0, 1)), ()),
        (encode_request(Request.SET_FEATURES, U64(0x1_7000_8000)), ()),
        (encode_request(Request.SET_MEM_TABLE, MemoryTable((RAM,)), need_reply=True), (70,)),
        (encode_request(Request.SET_VRING_NUM, VringState(0, 256)), ()),
        (encode_request(Request.SET_VRING_BASE, VringState(0, 0)), ()),
        (encode_request(Request.SET_VRING_ADDR, VringAddr(0, 0, UVA, UVA + 0x2000, UVA + 0x1000,
                                                          0x12000)), ()),
        (encode_request(Request.SET_VRING_KICK, VringFd(0)), (kick,)),
        (encode_request(Request.SET_LOG_BASE, Log(0x4000, 0)), (80,)),
        (encode_request(Request.SET_FEATURES, U64(0x1_7400_8000), need_reply=True), ()),
        (encode_request(Request.SET_VRING_ADDR, VringAddr(0, 1, UVA, UVA + 0x2000, UVA + 0x1000,
                                                          0x12000), need_reply=True), ()),
        (encode_request(Request.GET_VRING_BASE, VringState(0, 0)), ()),
    ]
    actions = []
    for data, fds in trace:
        message = parse(*split(data), fds)
        assert message.fds == fds
        actions.append(reply_action(message.request, message.flags, reply_ack=True))
    assert actions.count(A.BODY) == 5          # 3 GETs, SET_LOG_BASE, GET_VRING_BASE
    assert actions.count(A.ACK_SUCCESS) == 3   # SET_MEM_TABLE, SET_FEATURES, SET_VRING_ADDR


def test_parse_never_closes_fds_even_when_it_refuses():
    fd = os.eventfd(0)
    try:
        with pytest.raises(ProtocolError):
            parse(Header(Request.SET_VRING_KICK, 1, 8), U64(0x100).pack(), [fd])  # nofd + fd
        message = parse(Header(Request.REM_MEM_REG, 1, 40), SingleRegion(HIGH).pack(), [fd])
        assert message.stray_fds == (fd,)
        os.fstat(fd)          # still open: closing is the owner's job
    finally:
        os.close(fd)
