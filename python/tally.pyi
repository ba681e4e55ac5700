"""The tally license client for Python.

    import tally
    with tally.Client("lic1:27300", VENDOR_KEY) as c:
        with c.checkout("solver", version="2027.1") as lease:
            ...  # lease.valid; the library heartbeats the lease meanwhile

Calls that talk to a server release the GIL. Failures raise tally.Error subclasses.
"""

import os
from types import TracebackType
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Type, Union

__version__: str

class Error(Exception):
    """Every failure of the tally library; the subclasses say which kind."""

class BadInput(Error):
    """A bad argument: an unusable vendor key, no server given, a count of 0."""

class Unavailable(Error):
    """No license server could be reached, or it did not answer in time."""

class Untrusted(Error):
    """The server is not vouched for by a trusted vendor key."""

class ProtocolError(Error):
    """The server answered outside the protocol, or could not serve the request."""

class Denied(Error):
    """The server refused. str(e) is the message for users.

    The reason's own fields are attributes too, under the protocol's names:
    all_seats_in_use: total, in_use, requested, holders (and overdraft);
    version_above_ceiling: requested, ceiling; maintenance_expired: build_date,
    maintenance_until; expired: expired; queue_timeout: waited_secs;
    borrow_not_allowed: limit_secs; max_reached: limit, who; rate_limited:
    retry_after_ms; more_than_exist: total, requested, overdraft; ...
    """

    reason: str
    """The stable code: "not_licensed", "all_seats_in_use", "expired",
    "version_above_ceiling", "maintenance_expired", "queue_timeout", ..."""
    feature: Optional[str]
    """The feature refused; None for a reason that names none."""
    fields: Dict[str, Any]
    """All of the reason's fields."""
    def __getattr__(self, name: str) -> Any: ...

class Lease:
    """Seats held from a tally server; the library heartbeats them in the background.

    A context manager: the seats are checked in at the end of the with block, also
    when it raises. Or call checkin().
    """

    id: str
    """"L" and 16 hex digits, as `tally status` and the dashboard show it."""
    feature: str
    count: int
    ttl: int
    """Seconds without a heartbeat after which the server takes the seat back."""
    overdraft: bool
    """True if the seats are beyond the licensed count."""
    expires: Optional[int]
    """When the feature's licence ends, Unix seconds; None if permanent."""
    @property
    def status(self) -> str:
        """"active", "reconnecting" (the library re-attaches), "borrowed" or "lost"."""
    @property
    def valid(self) -> bool:
        """True while the seat is held (active, reconnecting or borrowed)."""
    @property
    def lost_reason(self) -> Optional[str]:
        """Why the lease was lost; None while it is held."""
    def checkin(self) -> None:
        """Checks the seats in and waits for the answer; a second call does nothing."""
    def __enter__(self) -> "Lease": ...
    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc_value: Optional[BaseException],
        traceback: Optional[TracebackType],
    ) -> bool: ...

class Client:
    """A connection to a tally license server; usable by several threads at once.

    servers: "host:port,host:port" or a list (None: the TALLY_SERVER variable).
    vendor_key: the vendor's public key, the .pub file's text (ship it in the product),
    or a path to that file. demo=True trusts the public demo key of `tallyd demo`.
    user, host, program: the identity to check out as (a service for its users).
    Timeouts in seconds (defaults 5 and 10). Raises Unavailable, Untrusted, BadInput.
    """

    def __init__(
        self,
        servers: Union[str, Sequence[str], None] = None,
        vendor_key: Union[str, bytes, "os.PathLike[str]", None] = None,
        *,
        demo: bool = False,
        user: Optional[str] = None,
        host: Optional[str] = None,
        program: Optional[str] = None,
        connect_timeout: Optional[float] = None,
        request_timeout: Optional[float] = None,
    ) -> None: ...
    def checkout(
        self,
        feature: str,
        version: Optional[str] = None,
        count: int = 1,
        wait: Optional[float] = None,
        *,
        build_date: Optional[int] = None,
        on_queue: Optional[Callable[[int], Any]] = None,
    ) -> Lease:
        """Checks out count seats of feature for the application's version (against
        the licence's ceiling) and build_date (Unix seconds, against its maintenance).
        wait: seconds to wait in the server's queue when no seat is free, calling
        on_queue(position) (1 = next) when the place changes. Raises Denied."""
    def borrow(
        self, feature: str, period: float, count: int = 1, version: Optional[str] = None
    ) -> int:
        """Borrows seats for period seconds into this user's cache (valid with no
        server); returns the end, Unix seconds. Raises Denied (borrow_not_allowed)."""
    def return_borrowed(self, feature: str) -> int:
        """Returns this user's borrowed seats of feature early; how many leases."""
    def status(self) -> Dict[str, Any]:
        """The server's status: server_time, server_fingerprint, features (list of
        dicts with name, total, in_use, expires, ...)."""
    def terms(self, feature: str) -> Optional[Dict[str, Any]]:
        """The licence terms: expires, maintenance_until (Unix seconds or None),
        evaluation, version_ceiling, attributes. None if not licensed."""
    def lost_seat_terms(self, feature: str) -> Tuple[int, str]:
        """(grace_seconds, "warn" or "stop"): what the vendor wants of a program that
        runs without its seat once the grace has run out."""
    def close(self) -> None:
        """Checks every lease in and closes; its leases then report "lost"."""
    def __enter__(self) -> "Client": ...
    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc_value: Optional[BaseException],
        traceback: Optional[TracebackType],
    ) -> bool: ...
