"""The one exception type the codec raises for bad input."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ifcvf.vhost.codes import BackendRequest, Request, request_name

if TYPE_CHECKING:
    from ifcvf.vhost.messages import Header


class ProtocolError(Exception):
    """A message broke the protocol.

    ``request`` is the request it concerns (a ``Request``/``BackendRequest``, or
    the raw code when unknown, or None before a header was read); ``header`` is
    the decoded header when there was one, so a back-end can still decide how to
    answer (see ``replies.reply_action``); ``reason`` says what was wrong and
    what was expected.
    """

    def __init__(self, reason: str, *, request: Request | BackendRequest | int | None = None,
                 header: Header | None = None) -> None:
        self.reason = reason
        self.request = request
        self.header = header
        super().__init__(f"{request_name(request)}: {reason}" if request is not None else reason)

    def about(self, request: Request | BackendRequest | int,
              header: Header | None = None) -> ProtocolError:
        """The same error, attributed to ``request`` (payload decoders do not
        know which request their bytes came with)."""
        return type(self)(self.reason, request=request, header=header or self.header)


class UnknownRequestError(ProtocolError):
    """A request code this codec does not know; ``code`` is the raw number."""

    def __init__(self, reason: str, *, request: int | None = None,
                 header: Header | None = None) -> None:
        super().__init__(reason, request=request, header=header)
        self.code = request
