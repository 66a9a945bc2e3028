"""Tests of kmnist_tune.data on real files: the kmnist-mini / k49-mini fixtures, the official
KMNIST files in shared/, and a real HTTP mirror on 127.0.0.1 (no mocks)."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from helpers import free_port

from kmnist_tune.errors import UserError
from kmnist_tune.training import data, splits
from kmnist_tune.training.data import DataError

FIXTURES = Path(__file__).resolve().parent / "fixtures"
KMNIST_MINI = FIXTURES / "kmnist-mini"
K49_MINI = FIXTURES / "k49-mini"
# The CI clone has a copy of shared/ beside the repository, as this machine does.
SHARED_KMNIST = Path(__file__).resolve().parents[2] / "shared/data/kmnist"
NPZ_FILES = [f.name for f in data.DATASETS["kmnist"].formats["npz"]["train"]] + [
    f.name for f in data.DATASETS["kmnist"].formats["npz"]["test"]
]
OFFICIAL_MD5 = {f.name: f.md5 for fmt in data.DATASETS["kmnist"].formats.values() for pair in fmt.values() for f in pair}


def one_line(err: pytest.ExceptionInfo[DataError]) -> str:
    msg = str(err.value)
    assert msg, "empty error message"
    assert "\n" not in msg, f"error is not one line: {msg!r}"
    assert isinstance(err.value, UserError)
    return msg


def copy_dir(src: Path, dst: Path) -> Path:
    # copyfile, not copytree's copy2: the shared folder is read-only and the copies must not be.
    dst.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        if p.is_file():
            shutil.copyfile(p, dst / p.name)
    return dst


def flip_byte(path: Path, offset: int | None = None) -> None:
    buf = bytearray(path.read_bytes())
    i = len(buf) // 2 if offset is None else offset
    buf[i] ^= 0xFF
    path.write_bytes(bytes(buf))


def rewrite_md5sums(folder: Path) -> None:
    """Make MD5SUMS match the folder's current files (to get past the md5 check on purpose)."""
    names = [line.split()[1] for line in (folder / "MD5SUMS").read_text().splitlines()]
    (folder / "MD5SUMS").write_text("".join(f"{hashlib.md5((folder / n).read_bytes()).hexdigest()}  {n}\n" for n in names))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not all((SHARED_KMNIST / n).is_file() for n in OFFICIAL_MD5):
        pytest.fail(
            f"the official KMNIST files are not at {SHARED_KMNIST}; these tests need the "
            "shared/ folder (shared/data/kmnist with the 8 official files) beside the repository"
        )
    return SHARED_KMNIST


@pytest.fixture(scope="session")
def official_npz(shared_dir: Path) -> dict[str, bytes]:
    return {n: (shared_dir / n).read_bytes() for n in NPZ_FILES}


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # urllib honours *_proxy variables; the local mirror must be reached directly.
    for var in (
        "http_proxy",
        "HTTP_PROXY",
        "https_proxy",
        "HTTPS_PROXY",
        "all_proxy",
        "ALL_PROXY",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv(data.MIRROR_ENV, raising=False)


class Mirror:
    """A real HTTP server on 127.0.0.1 laid out as <base>/kmnist/<official files>."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = {f"/kmnist/{n}": b for n, b in files.items()}
        self.cut_short: dict[str, int] = {}  # path -> bytes actually sent (full Content-Length)
        self.requests: list[str] = []
        mirror = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                mirror.requests.append(self.path)
                body = mirror.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                cut = mirror.cut_short.get(self.path)
                self.wfile.write(body if cut is None else body[:cut])

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def mirror(official_npz: dict[str, bytes]) -> Iterator[Mirror]:
    m = Mirror(dict(official_npz))
    yield m
    m.close()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.part"))


# ------------------------------------------------------------------------------- fixtures


def test_fixture_both_formats_load_identically() -> None:
    assert all(st.state == "ok" for st in data.verify("kmnist", KMNIST_MINI))
    for split, per_class in (("train", 120), ("test", 30)):
        x_npz, y_npz = data.load_split("kmnist", split, KMNIST_MINI, fmt="npz", download=False)
        x_idx, y_idx = data.load_split("kmnist", split, KMNIST_MINI, fmt="idx", download=False)
        assert x_npz.dtype == np.uint8 and x_npz.shape == (10 * per_class, 28, 28)
        assert y_npz.dtype == np.int64 and y_npz.shape == (10 * per_class,)
        assert np.array_equal(x_npz, x_idx) and np.array_equal(y_npz, y_idx)
        assert x_idx.dtype == np.uint8 and y_idx.dtype == np.int64
        assert np.bincount(y_npz).tolist() == [per_class] * 10
        # fmt None picks npz, and the fixture needs no network.
        x_any, _ = data.load_split("kmnist", split, KMNIST_MINI, mirror=f"http://127.0.0.1:{free_port()}")
        assert np.array_equal(x_any, x_npz)


def test_fixture_is_a_real_slice_of_the_official_files(shared_dir: Path) -> None:
    indices = json.loads((KMNIST_MINI / "indices.json").read_text())
    for split in ("test", "train"):
        x, y = data.load_split("kmnist", split, shared_dir, fmt="npz", download=False)
        fx, fy = data.load_split("kmnist", split, KMNIST_MINI, fmt="npz", download=False)
        assert np.array_equal(x[indices[split]], fx) and np.array_equal(y[indices[split]], fy)


def test_k49_mini_loads_with_49_classes() -> None:
    statuses = data.verify("k49", K49_MINI)
    assert [st.state for st in statuses] == ["ok"] * 4
    assert data.get_dataset("k49").n_classes == 49
    for split, per_class in (("train", 20), ("test", 6)):
        x, y = data.load_split("k49", split, K49_MINI, download=False)
        assert x.shape == (49 * per_class, 28, 28) and x.dtype == np.uint8
        assert y.dtype == np.int64 and np.bincount(y, minlength=49).tolist() == [per_class] * 49
    with pytest.raises(DataError) as err:
        data.load_split("k49", "train", K49_MINI, fmt="idx")
    assert "idx" in one_line(err)


# ------------------------------------------------------------------ the official files


def test_shared_folder_verifies_and_loads_read_only(shared_dir: Path) -> None:
    before = sorted(p.name for p in shared_dir.iterdir())
    statuses = data.verify("kmnist", shared_dir)
    assert {st.path.name: st.state for st in statuses} == dict.fromkeys(OFFICIAL_MD5, "ok")
    assert all(st.expected_md5 == OFFICIAL_MD5[st.path.name] for st in statuses)
    # No network needed for a complete folder: the mirror is a closed port.
    dead = f"http://127.0.0.1:{free_port()}"
    x, y = data.load_split("kmnist", "train", shared_dir, mirror=dead)
    assert x.shape == (60000, 28, 28) and x.dtype == np.uint8
    assert y.dtype == np.int64 and np.bincount(y).tolist() == [6000] * 10
    xt, yt = data.load_split("kmnist", "test", shared_dir, fmt="idx", mirror=dead)
    xn, yn = data.load_split("kmnist", "test", shared_dir, fmt="npz", mirror=dead)
    assert xt.shape == (10000, 28, 28) and np.array_equal(xt, xn) and np.array_equal(yt, yn)
    assert sorted(p.name for p in shared_dir.iterdir()) == before


# ---------------------------------------------------------------- checksum problems


def test_flipped_byte_is_corrupt_and_never_loaded(tmp_path: Path) -> None:
    d = copy_dir(KMNIST_MINI, tmp_path / "mini")
    flip_byte(d / "kmnist-train-imgs.npz")
    states = {st.path.name: st.state for st in data.verify("kmnist", d)}
    assert states.pop("kmnist-train-imgs.npz") == "corrupt"
    assert set(states.values()) == {"ok"}
    with pytest.raises(DataError) as err:
        data.load_split("kmnist", "train", d, fmt="npz", download=False)
    msg = one_line(err)
    assert "kmnist-train-imgs.npz" in msg and "corrupt" in msg and "MD5SUMS" in msg
    # fmt None falls back to idx, which verifies.
    x, _ = data.load_split("kmnist", "train", d, download=False)
    assert x.shape == (1200, 28, 28)
    # With idx broken too, the bad npz file is reported, not overwritten by a download.
    flip_byte(d / "train-labels-idx1-ubyte.gz")
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(DataError) as err:
        data.load_split("kmnist", "train", d, mirror=dead)
    assert "corrupt" in one_line(err)
    assert leftovers(d) == []


def test_truncated_file_is_partial_or_corrupt(tmp_path: Path, shared_dir: Path) -> None:
    # Official sizes known: a short file is "partial".
    d = tmp_path / "official"
    d.mkdir()
    shutil.copyfile(shared_dir / "kmnist-test-labels.npz", d / "kmnist-test-labels.npz")
    (d / "kmnist-test-labels.npz").write_bytes((d / "kmnist-test-labels.npz").read_bytes()[:1000])
    st = {s.path.name: s for s in data.verify("kmnist", d, fmt="npz")}
    assert st["kmnist-test-labels.npz"].state == "partial"
    assert st["kmnist-test-imgs.npz"].state == "missing"
    with pytest.raises(DataError) as err:
        data.load_split("kmnist", "test", d, download=False)
    assert "truncated" in one_line(err) and "delete it and run" in str(err.value)
    # Under MD5SUMS the size is unknown: still caught, as "corrupt".
    m = copy_dir(KMNIST_MINI, tmp_path / "mini")
    (m / "t10k-images-idx3-ubyte.gz").write_bytes((m / "t10k-images-idx3-ubyte.gz").read_bytes()[:5000])
    st = {s.path.name: s for s in data.verify("kmnist", m, fmt="idx")}
    assert st["t10k-images-idx3-ubyte.gz"].state in ("partial", "corrupt")
    with pytest.raises(DataError) as err:
        data.load_split("kmnist", "test", m, fmt="idx", download=False)
    assert "t10k-images-idx3-ubyte.gz" in one_line(err)


def test_malformed_files_that_pass_md5_are_rejected(tmp_path: Path) -> None:
    d = copy_dir(KMNIST_MINI, tmp_path / "mini")
    labels = gzip.decompress((d / "t10k-labels-idx1-ubyte.gz").read_bytes())
    cases = {
        "wrong magic": (2051).to_bytes(4, "big") + labels[4:],
        "count mismatch": labels[:-5],
        "not gzip": b"plain bytes",
    }
    for why, raw in cases.items():
        body = raw if why == "not gzip" else gzip.compress(raw)
        (d / "t10k-labels-idx1-ubyte.gz").write_bytes(body)
        rewrite_md5sums(d)
        with pytest.raises(DataError) as err:
            data.load_split("kmnist", "test", d, fmt="idx", download=False)
        assert "malformed" in one_line(err), why
    # Train labels beside test images: both verify, lengths differ.
    shutil.copyfile(d / "kmnist-train-labels.npz", d / "kmnist-test-labels.npz")
    rewrite_md5sums(d)
    with pytest.raises(DataError) as err:
        data.load_split("kmnist", "test", d, fmt="npz", download=False)
    assert "300 images" in one_line(err) and "1200 labels" in str(err.value)


def test_bad_md5sums_line(tmp_path: Path) -> None:
    d = copy_dir(KMNIST_MINI, tmp_path / "mini")
    (d / "MD5SUMS").write_text("not a checksum line\n")
    with pytest.raises(DataError) as err:
        data.verify("kmnist", d)
    assert "MD5SUMS" in one_line(err)


# ---------------------------------------------------------------------------- downloads


def test_fetch_downloads_verifies_and_then_stays_offline(mirror: Mirror, tmp_path: Path) -> None:
    dest = tmp_path / "cache" / "kmnist-tune"  # does not exist yet
    calls: list[tuple[str, int, int | None]] = []
    paths = data.fetch("kmnist", dest, mirror=mirror.url + "/", progress=lambda *a: calls.append(a))
    assert [p.name for p in paths] == NPZ_FILES
    assert sorted(mirror.requests) == sorted(f"/kmnist/{n}" for n in NPZ_FILES)
    statuses = data.verify("kmnist", dest, fmt="npz")
    assert all(st.state == "ok" and st.expected_md5 == OFFICIAL_MD5[st.path.name] for st in statuses)
    last = {name: (done, total) for name, done, total in calls}
    assert all(done == total == (dest / n).stat().st_size for n, (done, total) in last.items())
    assert set(last) == set(NPZ_FILES) and leftovers(dest) == []

    mirror.requests.clear()
    assert data.fetch("kmnist", dest, mirror=mirror.url) == paths
    x, y = data.load_split("kmnist", "test", dest, mirror=mirror.url)
    assert x.shape == (10000, 28, 28) and y.shape == (10000,)
    assert mirror.requests == []


def test_load_split_downloads_missing_files(mirror: Mirror, tmp_path: Path, shared_dir: Path) -> None:
    dest = tmp_path / "d"
    dest.mkdir()
    for n in NPZ_FILES[:2]:  # the train files are already there
        shutil.copyfile(shared_dir / n, dest / n)
    x, y = data.load_split("kmnist", "test", dest, mirror=mirror.url)
    assert x.shape == (10000, 28, 28) and y.dtype == np.int64
    assert sorted(mirror.requests) == sorted(f"/kmnist/{n}" for n in NPZ_FILES[2:])


@pytest.mark.parametrize("damage", ["corrupted", "truncated", "cut short"])
def test_fetch_rejects_a_bad_download(mirror: Mirror, tmp_path: Path, shared_dir: Path, damage: str) -> None:
    name = "kmnist-test-imgs.npz"
    body = bytearray(mirror.files[f"/kmnist/{name}"])
    if damage == "corrupted":
        body[len(body) // 2] ^= 0xFF
        mirror.files[f"/kmnist/{name}"] = bytes(body)
    elif damage == "truncated":
        mirror.files[f"/kmnist/{name}"] = bytes(body[: len(body) // 2])
    else:  # announces the full length, then the connection closes early
        mirror.cut_short[f"/kmnist/{name}"] = len(body) // 3
    dest = tmp_path / "d"
    dest.mkdir()
    for n in NPZ_FILES:
        if n != name:
            shutil.copyfile(shared_dir / n, dest / n)
    with pytest.raises(DataError) as err:
        data.fetch("kmnist", dest, mirror=mirror.url)
    msg = one_line(err)
    assert name in msg and damage in msg
    assert not (dest / name).exists() and leftovers(dest) == []
    assert mirror.requests == [f"/kmnist/{name}"]


def test_fetch_replaces_a_corrupt_local_file(mirror: Mirror, tmp_path: Path) -> None:
    dest = tmp_path / "d"
    data.fetch("kmnist", dest, mirror=mirror.url)
    flip_byte(dest / "kmnist-test-labels.npz")
    mirror.requests.clear()
    data.fetch("kmnist", dest, mirror=mirror.url)
    assert mirror.requests == ["/kmnist/kmnist-test-labels.npz"]
    assert all(st.state == "ok" for st in data.verify("kmnist", dest, fmt="npz"))


def test_http_error_is_one_line(mirror: Mirror, tmp_path: Path) -> None:
    del mirror.files["/kmnist/kmnist-test-labels.npz"]
    with pytest.raises(DataError) as err:
        data.fetch("kmnist", tmp_path / "d", mirror=mirror.url)
    msg = one_line(err)
    assert "404" in msg and "kmnist-test-labels.npz" in msg and "--mirror" in msg
    assert not (tmp_path / "d" / "kmnist-test-labels.npz").exists()
    assert leftovers(tmp_path / "d") == []


def test_missing_data_and_unreachable_mirror(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(DataError) as err:
        data.load_split("kmnist", "train", tmp_path / "empty", mirror=dead)
    msg = one_line(err)
    assert "cannot download" in msg and dead in msg and "--mirror" in msg
    assert not (tmp_path / "empty").exists()  # a folder fetch made for nothing is removed
    with pytest.raises(DataError) as err:
        data.load_split("kmnist", "train", tmp_path / "empty2", download=False)
    assert "not found" in one_line(err)


def test_custom_md5sums_file_is_not_downloaded(mirror: Mirror, tmp_path: Path) -> None:
    d = copy_dir(KMNIST_MINI, tmp_path / "mini")
    (d / "kmnist-test-imgs.npz").unlink()
    with pytest.raises(DataError) as err:
        data.load_split("kmnist", "test", d, fmt="npz", mirror=mirror.url)
    assert "MD5SUMS" in one_line(err)
    assert mirror.requests == []


# ---------------------------------------------------------------------- configuration


def test_locations_and_names(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "x"))
    assert data.default_data_dir() == tmp_path / "x"
    assert data.resolve_data_dir(None) == tmp_path / "x"
    monkeypatch.delenv(data.DATA_DIR_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert data.default_data_dir() == tmp_path / "cache" / "kmnist-tune"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data.default_data_dir() == tmp_path / "home" / ".cache" / "kmnist-tune"
    assert data.resolve_data_dir("~/d") == tmp_path / "home" / "d"

    assert data.resolve_mirror(None) == data.DEFAULT_MIRROR
    monkeypatch.setenv(data.MIRROR_ENV, "http://example.org/m/")
    assert data.resolve_mirror(None) == "http://example.org/m"
    assert data.resolve_mirror("https://other/") == "https://other"
    with pytest.raises(DataError):
        data.resolve_mirror("ftp:/nope")

    with pytest.raises(DataError) as err:
        data.get_dataset("mnist")
    assert "k49" in one_line(err) and "kmnist" in str(err.value)
    with pytest.raises(DataError):
        data.load_split("kmnist", "valid", KMNIST_MINI)


# --------------------------------------------------------------- stratified selection


def imbalanced_labels() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.permutation(np.repeat(np.arange(5), [400, 200, 50, 9, 2]))


def test_stratified_split() -> None:
    labels = imbalanced_labels()
    train, valid = splits.stratified_split(labels, 0.2, seed=1)
    assert np.intersect1d(train, valid).size == 0
    assert np.array_equal(np.sort(np.concatenate([train, valid])), np.arange(len(labels)))
    counts = np.bincount(labels)
    v_counts = np.bincount(labels[valid], minlength=5)
    assert np.all(np.abs(v_counts - 0.2 * counts) <= 1)
    assert np.all(v_counts >= 1) and np.all(np.bincount(labels[train], minlength=5) >= 1)
    again = splits.stratified_split(labels, 0.2, seed=1)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], valid)
    other = splits.stratified_split(labels, 0.2, seed=2)
    assert not np.array_equal(other[1], valid)
    assert np.array_equal(np.bincount(labels[other[1]], minlength=5), v_counts)
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(DataError):
            splits.stratified_split(labels, bad, seed=1)


def test_stratified_subset() -> None:
    labels = imbalanced_labels()
    train, _ = splits.stratified_split(labels, 0.2, seed=1)
    assert splits.stratified_subset(train, labels, None, seed=3) is train
    assert splits.stratified_subset(train, labels, len(train) + 5, seed=3) is train
    sub = splits.stratified_subset(train, labels, 100, seed=3)
    assert len(sub) == 100 and len(np.unique(sub)) == 100
    assert np.isin(sub, train).all()
    share = np.bincount(labels[train], minlength=5) / len(train)
    assert np.all(np.abs(np.bincount(labels[sub], minlength=5) - 100 * share) <= 1)
    assert np.array_equal(sub, splits.stratified_subset(train, labels, 100, seed=3))
    assert not np.array_equal(sub, splits.stratified_subset(train, labels, 100, seed=4))
    with pytest.raises(DataError):
        splits.stratified_subset(train, labels, 0, seed=3)
