"""The tally Python package against a real tallyd (see conftest.py)."""

import calendar
import pathlib
import threading
import time

import pytest
import tally

from conftest import run, tool, wait_until


def in_use(client, feature):
    """Seats of feature in use, from the server's status."""
    for f in client.status()["features"]:
        if f["name"] == feature:
            return f["in_use"]
    raise AssertionError(f"{feature} not in the status")


def test_checkout_then_checkin_frees_the_seat_for_another_client(daemon):
    with tally.Client(daemon.addr, daemon.vendor_key) as a, tally.Client(
        [daemon.addr], daemon.vendor_key
    ) as b:
        lease = a.checkout("solver", version="2027.1")
        assert lease.valid and lease.status == "active" and lease.lost_reason is None
        assert lease.id.startswith("L") and len(lease.id) == 17
        assert (lease.feature, lease.count, lease.overdraft) == ("solver", 1, False)
        assert lease.ttl > 0
        # expires = "2031-06-30" is the last valid day: the licence ends at the next midnight.
        assert lease.expires == calendar.timegm((2031, 7, 1, 0, 0, 0))
        assert in_use(b, "solver") == 1
        with pytest.raises(tally.Denied):
            b.checkout("solver")
        lease.checkin()
        assert not lease.valid and lease.status == "lost"
        lease.checkin()  # a second checkin does nothing
        assert in_use(b, "solver") == 0
        with b.checkout("solver", version="2027.1") as again:
            assert again.valid


def test_denial_carries_the_reason_and_its_fields(daemon):
    with tally.Client(daemon.addr, daemon.vendor_key) as a, tally.Client(
        daemon.addr, daemon.vendor_key, user="bob", host="ws2"
    ) as b:
        with a.checkout("solver"):
            with pytest.raises(tally.Denied) as denied:
                b.checkout("solver", count=1)
    e = denied.value
    assert isinstance(e, tally.Error)
    assert e.reason == "all_seats_in_use"
    assert (e.feature, e.total, e.in_use, e.requested) == ("solver", 1, 1, 1)
    assert len(e.holders) == 1 and "@" in e.holders[0]
    assert e.fields["total"] == 1
    assert "solver" in str(e)


def test_not_licensed_and_bad_count(daemon):
    with tally.Client(daemon.addr, daemon.vendor_key) as c:
        with pytest.raises(tally.Denied) as denied:
            c.checkout("mesher")
        assert denied.value.reason == "not_licensed" and denied.value.feature == "mesher"
        with pytest.raises(tally.BadInput, match="count is 0"):
            c.checkout("solver", count=0)
        with pytest.raises(tally.BadInput, match="wait"):
            c.checkout("solver", wait=-1)


def test_version_above_ceiling_and_build_after_maintenance_are_refused(daemon):
    with tally.Client(daemon.addr, daemon.vendor_key) as c:
        with pytest.raises(tally.Denied) as denied:
            c.checkout("solver", version="2027.2")
        e = denied.value
        assert e.reason == "version_above_ceiling"
        assert (e.requested, e.ceiling) == ("2027.2", "2027.1")
        # Built 2027-07-01, after maintenance_until.
        built = calendar.timegm((2027, 7, 1, 12, 0, 0))
        with pytest.raises(tally.Denied) as denied:
            c.checkout("solver", version="2027.1", build_date=built)
        e = denied.value
        assert e.reason == "maintenance_expired" and e.build_date == built
        # A build from within maintenance is served.
        with c.checkout("solver", version="2027.1", build_date=calendar.timegm((2027, 6, 1, 0, 0, 0))) as lease:
            assert lease.valid
        assert in_use(c, "solver") == 0


def test_waiting_in_the_queue_gets_the_seat_when_it_is_freed_and_releases_the_gil(daemon):
    with tally.Client(daemon.addr, daemon.vendor_key) as a, tally.Client(
        daemon.addr, daemon.vendor_key, user="bob"
    ) as b:
        held = a.checkout("solver")
        positions = []
        result = {}

        def wait_for_seat():
            try:
                result["lease"] = b.checkout("solver", wait=60, on_queue=positions.append)
            except Exception as e:  # reported by the main thread
                result["error"] = e

        waiter = threading.Thread(target=wait_for_seat)
        waiter.start()
        # The queue callback runs from inside the waiting checkout: the waiter is queued.
        wait_until(lambda: positions, what="the waiter's queue position")
        assert positions[0] == 1
        # While the waiter is in Rust waiting on the server, this thread runs Python
        # code: a checkout that kept the GIL would stop this loop until its wait ends.
        start = time.monotonic()
        spins = 0
        while time.monotonic() - start < 0.5:
            spins += 1
        assert waiter.is_alive() and "lease" not in result and "error" not in result
        assert spins > 10000
        held.checkin()
        waiter.join(timeout=30)
        assert not waiter.is_alive(), "the waiter did not get the freed seat within 30 s"
        assert "error" not in result, result.get("error")
        lease = result["lease"]
        assert lease.valid and in_use(a, "solver") == 1
        lease.checkin()


def test_one_client_serves_several_threads_at_once(daemon):
    with tally.Client(daemon.addr, daemon.vendor_key) as c:
        held = c.checkout("solver")
        results, positions = {}, []

        def queued():
            # Waits in the queue through the same client the main thread uses meanwhile.
            try:
                results["solver"] = c.checkout("solver", wait=60, on_queue=positions.append)
            except Exception as e:  # reported by the main thread
                results["error"] = e

        waiter = threading.Thread(target=queued)
        waiter.start()
        wait_until(lambda: positions, what="the waiter's queue position")
        with c.checkout("viewer", count=2) as viewers:
            assert viewers.valid and in_use(c, "viewer") == 2
        held.checkin()
        waiter.join(timeout=30)
        assert not waiter.is_alive() and "error" not in results, results
        assert results["solver"].valid
        results["solver"].checkin()


def test_a_wait_that_runs_out_is_a_queue_timeout(daemon):
    with tally.Client(daemon.addr, daemon.vendor_key) as a, tally.Client(
        daemon.addr, daemon.vendor_key, user="bob"
    ) as b:
        with a.checkout("solver"):
            start = time.monotonic()
            with pytest.raises(tally.Denied) as denied:
                b.checkout("solver", wait=1)
            assert time.monotonic() - start >= 0.9
            assert denied.value.reason == "queue_timeout"


def test_the_lease_context_manager_checks_in_when_the_block_raises(daemon):
    with tally.Client(daemon.addr, daemon.vendor_key) as c:
        with pytest.raises(RuntimeError, match="solver crashed"):
            with c.checkout("solver") as lease:
                assert in_use(c, "solver") == 1
                raise RuntimeError("solver crashed")
        assert not lease.valid
        assert in_use(c, "solver") == 0


def test_closing_the_client_checks_its_leases_in(daemon):
    with tally.Client(daemon.addr, daemon.vendor_key) as observer:
        c = tally.Client(daemon.addr, daemon.vendor_key)
        lease = c.checkout("solver")
        c.close()
        assert lease.status == "lost" and not lease.valid
        assert in_use(observer, "solver") == 0
        with pytest.raises(tally.Error, match="closed"):
            c.checkout("solver")
        c.close()  # closing twice does nothing


def test_terms_and_borrowing(daemon):
    with tally.Client(daemon.addr, daemon.vendor_pub) as c:
        terms = c.terms("solver")
        assert terms["attributes"] == {"edition": "pro"}
        assert terms["version_ceiling"] == "2027.1"
        assert terms["maintenance_until"] is not None and terms["evaluation"] is False
        assert c.terms("mesher") is None
        with pytest.raises(tally.Denied) as denied:
            c.borrow("solver", 3600)
        assert denied.value.reason == "borrow_not_allowed"
        until = c.borrow("viewer", 1800)
        assert time.time() + 1700 < until < time.time() + 1900
        assert in_use(c, "viewer") == 1
        assert c.return_borrowed("viewer") == 1
        assert in_use(c, "viewer") == 0


def test_bad_vendor_keys_are_clear_errors(daemon, tmp_path):
    missing = tmp_path / "nowhere" / "vendor.pub"
    with pytest.raises(tally.BadInput, match="cannot read the vendor key file .*nowhere/vendor.pub"):
        tally.Client(daemon.addr, missing)
    with pytest.raises(tally.BadInput, match="cannot read the vendor key file"):
        tally.Client(daemon.addr, str(missing))
    garbage = tmp_path / "garbage.pub"
    garbage.write_text("not a key\n")
    with pytest.raises(tally.BadInput, match="garbage.pub: not a tally public key"):
        tally.Client(daemon.addr, garbage)
    with pytest.raises(tally.BadInput, match="not usable"):
        tally.Client(daemon.addr, "-----BEGIN TALLY PUBLIC KEY-----\nxyz\n")
    with pytest.raises(tally.BadInput, match="vendor public key"):
        tally.Client(daemon.addr)
    with pytest.raises(tally.BadInput, match="servers"):
        tally.Client(42, daemon.vendor_key)


def test_a_server_of_another_vendor_is_not_trusted(daemon, tmp_path):
    other = tmp_path / "other"
    run(tool("tally-publisher"), "keygen", "--out", other)
    with pytest.raises(tally.Untrusted, match="not a trusted vendor key"):
        tally.Client(daemon.addr, pathlib.Path(f"{other}.pub"))


def test_no_server_is_unavailable():
    # Port 9 on loopback (discard): nothing listens there.
    with pytest.raises(tally.Unavailable):
        tally.Client("127.0.0.1:9", demo=True, connect_timeout=2)
