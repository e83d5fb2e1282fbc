"""What a back-end must send back for a request, success or failure.

The rules, from the spec's Communication and REPLY_ACK sections and QEMU 7.2:

* A request with an explicit reply (GET_*, GET_VRING_BASE, IOTLB_MSG, GET_CONFIG,
  SET_LOG_BASE when LOG_SHMFD was negotiated, ...) gets exactly that reply, and
  never an extra ack, whatever NEED_REPLY says (DPDK clears NEED_REPLY when it
  sends such a reply; QEMU would read the ack as the next reply and fail).
* Any other request gets a u64 ack (0 = success) only when REPLY_ACK was
  negotiated *and* the request set NEED_REPLY; otherwise nothing. "Negotiated"
  means REPLY_ACK is in the front-end's SET_PROTOCOL_FEATURES value: QEMU 7.2
  already waits for acks (SET_BACKEND_REQ_FD) before it sends SET_FEATURES.
* SET_LOG_BASE's reply body is unspecified; QEMU checks only its request code.
  Send it empty, as DPDK and QEMU's own test server do.

Failures and requests the back-end does not support (the spec says no more
than the two rules above, so the rest is decided here and documented):

* NEED_REPLY with REPLY_ACK -> a non-zero ack. For an unknown request code too:
  the front-end asked for a status, and "failed" is the truthful one.
* A request with an explicit reply that has a failure form answers with it
  (GET_CONFIG: an empty body, as the spec says; IOTLB_MSG, POSTCOPY_END,
  CHECK_DEVICE_STATE...: a non-zero u64).
* A request with an explicit reply and no failure form (GET_FEATURES,
  GET_QUEUE_NUM, GET_VRING_BASE, GET_STATUS, SET_LOG_BASE...): any body would
  be read as a value, and sending nothing leaves the front-end blocked, so the
  back-end closes the connection (the spec allows closing on errors; QEMU then
  fails the operation instead of hanging or using a made-up value).
* An unknown request code without an ack to carry the failure: the back-end
  cannot know whether the front-end waits for a reply, so it closes too. Every
  extension is gated by a feature bit, so a conforming front-end never sends one.
* A known request without any reply: nothing is sent; the request is refused
  without changing state and the reason logged.
* A header that breaks the framing rules (version not 1, REPLY set, undefined
  flag bits) cannot be trusted to say whether a reply is awaited: close.
"""
from __future__ import annotations

import enum

from ifcvf.vhost.codes import (
    FLAG_NEED_REPLY, FLAG_REPLY, KNOWN_FLAGS, VERSION, VERSION_MASK, Request)
from ifcvf.vhost.specs import REQUEST_SPECS, FailureReply


class ReplyAction(enum.Enum):
    """What to send; each value names the encoder to use."""

    NOTHING = "send nothing"
    BODY = "the request's own reply: encode_reply(request, body)"
    ACK_SUCCESS = "a u64 0: encode_ack(request, True)"
    ACK_FAILURE = "a non-zero u64: encode_ack(request, False)"
    FAILURE_BODY = "the request's reply in its failure form: encode_failure_reply(request)"
    CLOSE = "close the connection: no truthful reply exists and the front-end may be waiting"


def reply_action(request: Request | int, flags: int, *, reply_ack: bool, log_shmfd: bool = True,
                 ok: bool = True) -> ReplyAction:
    """The reply a back-end owes for ``request`` sent with header ``flags``.

    ``reply_ack``: REPLY_ACK is negotiated. ``log_shmfd``: LOG_SHMFD is negotiated
    (SET_LOG_BASE has a reply only then). ``ok``: the request was handled; False
    for a failure, a ``ProtocolError`` from ``parse``, an ungated or unsupported
    request (for an unknown code pass the raw int from the header).
    """
    if (flags & VERSION_MASK) != VERSION or flags & FLAG_REPLY or flags & ~KNOWN_FLAGS:
        return ReplyAction.CLOSE
    acked = reply_ack and bool(flags & FLAG_NEED_REPLY)
    try:
        spec = REQUEST_SPECS[Request(request)]
    except ValueError:
        return ReplyAction.ACK_FAILURE if acked else ReplyAction.CLOSE
    reply = spec.reply
    if spec.request is Request.SET_LOG_BASE and not log_shmfd:
        reply = None
    if reply is not None:
        if ok:
            return ReplyAction.BODY
        if reply.failure is FailureReply.IMPOSSIBLE:
            return ReplyAction.CLOSE
        return ReplyAction.FAILURE_BODY
    if acked:
        return ReplyAction.ACK_SUCCESS if ok else ReplyAction.ACK_FAILURE
    return ReplyAction.NOTHING
