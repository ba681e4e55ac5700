"""Fixtures: a vendor key and a signed bundle made with the real tools, and a real
tallyd serving it on a loopback port, stopped at the end of each test.

The binaries come from TALLY_BIN_DIR, else $CARGO_TARGET_DIR/debug, else the
repository's target/debug (what `cargo build --workspace` writes).
"""

import os
import pathlib
import queue
import subprocess
import threading
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]

# solver: one seat, versions up to 2027.1, builds up to 2027-06-30; viewer: two seats
# that may be borrowed for an hour; both carry a vendor attribute.
SPEC = """\
id = "py-2027-0001"
vendor = "Acme Simulation"
[customer]
id = "C-1001"
name = "Example Corp"
[[feature]]
name = "solver"
seats = 1
version_ceiling = "2027.1"
maintenance_until = "2027-06-30"
expires = "2031-06-30"
attributes = { edition = "pro" }
[[feature]]
name = "viewer"
seats = 2
borrow_limit_hours = 1
"""


def bin_dir() -> pathlib.Path:
    """Where the tallyd and tally-publisher binaries are."""
    if os.environ.get("TALLY_BIN_DIR"):
        return pathlib.Path(os.environ["TALLY_BIN_DIR"])
    target = os.environ.get("CARGO_TARGET_DIR") or str(REPO / "target")
    return pathlib.Path(target) / "debug"


def tool(name: str) -> str:
    path = bin_dir() / name
    if not path.exists():
        pytest.fail(f"{path} is missing: build it with `cargo build --workspace` or set TALLY_BIN_DIR")
    return str(path)


def run(*args) -> str:
    out = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"{args} exited {out.returncode}: {out.stderr}"
    return out.stdout


class Daemon:
    """A running `tallyd run`: its address and the vendor key that trusts it."""

    def __init__(self, root: pathlib.Path):
        self.root = root
        root.mkdir()
        data, bundles = root / "data", root / "bundles"
        bundles.mkdir()
        run(tool("tallyd"), "init", "--data-dir", data)
        run(tool("tallyd"), "request", "--data-dir", data, "--out", root / "activation.req")
        run(tool("tally-publisher"), "keygen", "--out", root / "vendor")
        (root / "spec.toml").write_text(SPEC)
        run(
            tool("tally-publisher"), "issue",
            "--vendor-key", root / "vendor.key",
            "--spec", root / "spec.toml",
            "--request", root / "activation.req",
            "--out", bundles / "py.bundle",
        )
        (root / "tallyd.toml").write_text(
            f'listen = "127.0.0.1:0"\nhttp = false\ndata_dir = "{data}"\n'
            f'bundle_dir = "{bundles}"\nvendor_keys = ["{root / "vendor.pub"}"]\n'
        )
        self.vendor_pub = root / "vendor.pub"
        self.vendor_key = self.vendor_pub.read_text()
        self.log = root / "tallyd.log"
        self.proc = subprocess.Popen(
            [tool("tallyd"), "run", "--config", str(root / "tallyd.toml")],
            stdout=subprocess.PIPE,
            stderr=open(self.log, "wb"),
            text=True,
        )
        self.addr = self._banner(timeout=30)

    def _banner(self, timeout: float) -> str:
        """The address from tallyd's "listening on ADDR" line, read by a thread so that
        the wait has a deadline."""
        lines: "queue.Queue[str]" = queue.Queue()

        def read():
            for line in self.proc.stdout:
                if "listening on " in line:
                    lines.put(line.split("listening on ", 1)[1].split()[0])

        threading.Thread(target=read, daemon=True).start()
        try:
            return lines.get(timeout=timeout)
        except queue.Empty:
            self.stop()
            pytest.fail(f"tallyd printed no 'listening on' line in {timeout} s:\n{self.log.read_text()}")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(autouse=True)
def private_env(tmp_path, monkeypatch):
    """Each test has its own borrow cache, and no TALLY_SERVER from the caller."""
    monkeypatch.setenv("TALLY_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("TALLY_SERVER", raising=False)


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(tmp_path / "site")
    yield d
    d.stop()


def wait_until(condition, timeout: float = 15.0, what: str = "condition"):
    """Polls condition() until it is true; fails the test after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout} s")
        time.sleep(0.05)
