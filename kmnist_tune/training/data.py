"""KMNIST / Kuzushiji-49 files: where they live, checking them, downloading them, loading them.

Every file is checked by md5 before it is used. A file that does not match is never
loaded: the user gets a one-line `DataError` saying which file is wrong and how to fix it.
A data folder that holds an `MD5SUMS` file (plain `md5sum` output) is checked against those
sums instead of the official ones, so a user's own subset (or the test fixture) works too.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import lzma
import os
import re
import secrets
import struct
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ..errors import UserError, one_line

DEFAULT_MIRROR = "http://codh.rois.ac.jp/kmnist/dataset"
MIRROR_ENV = "KMNIST_TUNE_MIRROR"
DATA_DIR_ENV = "KMNIST_TUNE_DATA"
MD5SUMS_NAME = "MD5SUMS"
FETCH_HINT = "kmnist-tune data fetch"

IMAGE_SHAPE = (28, 28)
SPLITS = ("train", "test")
_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049
_CHUNK = 1 << 16
_TIMEOUT_S = 30.0


class DataError(UserError):
    """A data file is missing, corrupt, malformed or cannot be downloaded."""

    def __init__(self, message: str) -> None:
        # The CLI prints this as one line; an embedded OS or server message must not break that.
        super().__init__(" ".join(str(message).split()))


# The characters each class index stands for, in the order of CODH's kmnist_classmap.csv and
# k49_classmap.csv: KMNIST takes one hiragana from each row of the gojuon table; K49 is the 48
# hiragana in gojuon order (with the archaic ゐ and ゑ) and the iteration mark ゝ.
CLASS_CHARS = {
    "kmnist": "おきすつなはまやれを",
    "k49": "あいうえおかきくけこさしすせそたちつてとなにぬねのはひふへほまみむめもやゆよらりるれろわゐゑをんゝ",
}


def class_map(dataset: str) -> list[dict[str, int | str]]:
    """[{index, codepoint ("U+304A"), char}] for every class of the data set."""
    return [{"index": i, "codepoint": f"U+{ord(c):04X}", "char": c} for i, c in enumerate(CLASS_CHARS[dataset])]


@dataclass(frozen=True)
class DataFile:
    name: str
    md5: str
    size: int | None  # official size in bytes where known


@dataclass(frozen=True)
class DatasetInfo:
    name: str  # "kmnist" | "k49"
    n_classes: int
    # fmt ("npz" | "idx") -> split ("train" | "test") -> (images, labels)
    formats: dict[str, dict[str, tuple[DataFile, DataFile]]]
    # split -> images in the official release: the most a file of that split may hold (a user's subset
    # under MD5SUMS holds fewer), checked from the file's header before its body is read.
    counts: dict[str, int]


DATASETS: dict[str, DatasetInfo] = {
    "kmnist": DatasetInfo(
        name="kmnist",
        n_classes=10,
        formats={
            "npz": {
                "train": (
                    DataFile(
                        "kmnist-train-imgs.npz",
                        "a183fbc01ed9a345513b145673d3d0bb",
                        18384171,
                    ),
                    DataFile(
                        "kmnist-train-labels.npz",
                        "b0e1d240e8afec72b50437fc3bc5908a",
                        29700,
                    ),
                ),
                "test": (
                    DataFile(
                        "kmnist-test-imgs.npz",
                        "dace6de62ca8b90843cc45366337d02e",
                        3079479,
                    ),
                    DataFile(
                        "kmnist-test-labels.npz",
                        "3ae489a79983d0fe386152684e3b5412",
                        5304,
                    ),
                ),
            },
            "idx": {
                "train": (
                    DataFile(
                        "train-images-idx3-ubyte.gz",
                        "bdb82020997e1d708af4cf47b453dcf7",
                        18165135,
                    ),
                    DataFile(
                        "train-labels-idx1-ubyte.gz",
                        "e144d726b3acfaa3e44228e80efcd344",
                        29497,
                    ),
                ),
                "test": (
                    DataFile(
                        "t10k-images-idx3-ubyte.gz",
                        "5c965bf0a639b31b8f53240b1b52f4d7",
                        3041136,
                    ),
                    DataFile(
                        "t10k-labels-idx1-ubyte.gz",
                        "7320c461ea6c1c855c0b718fb2a4b134",
                        5120,
                    ),
                ),
            },
        },
        counts={"train": 60000, "test": 10000},
    ),
    # Official K49 sizes are not recorded here (no verified copy was at hand), so a short K49
    # file shows as "corrupt" rather than "partial"; the md5 check is what guards loading.
    "k49": DatasetInfo(
        name="k49",
        n_classes=49,
        formats={
            "npz": {
                "train": (
                    DataFile("k49-train-imgs.npz", "7ac088b20481cf51dcd01ceaab89d821", None),
                    DataFile("k49-train-labels.npz", "44a8e1b893f81e63ff38d73cad420f7a", None),
                ),
                "test": (
                    DataFile("k49-test-imgs.npz", "d352e201d846ce6b94f42c990966f374", None),
                    DataFile("k49-test-labels.npz", "4da6f7a62e67a832d5eb1bd85c5ee448", None),
                ),
            },
        },
        counts={"train": 232365, "test": 38547},
    ),
}


@dataclass
class FileStatus:
    path: Path
    state: str  # "ok" | "missing" | "corrupt" | "partial"
    detail: str
    expected_md5: str


# ---------------------------------------------------------------------------------------------
# Locations


def default_data_dir() -> Path:
    """$KMNIST_TUNE_DATA, else $XDG_CACHE_HOME/kmnist-tune, else ~/.cache/kmnist-tune."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME")
    base = Path(cache).expanduser() if cache else Path.home() / ".cache"
    return base / "kmnist-tune"


def resolve_data_dir(data_dir: str | Path | None) -> Path:
    if data_dir is None or str(data_dir) == "":
        return default_data_dir()
    return Path(data_dir).expanduser()


def resolve_mirror(mirror: str | None) -> str:
    """The mirror base URL without a trailing slash; a file is at {base}/{dataset}/{name}."""
    if not mirror:
        mirror = os.environ.get(MIRROR_ENV) or DEFAULT_MIRROR
    mirror = mirror.strip().rstrip("/")
    scheme = mirror.split("://", 1)[0].lower() if "://" in mirror else ""
    if scheme not in ("http", "https", "file"):
        raise DataError(
            f"mirror {mirror!r} is not an http://, https:// or file:// URL; "
            f"fix --mirror / {MIRROR_ENV} (default {DEFAULT_MIRROR})"
        )
    return mirror


def get_dataset(name: str) -> DatasetInfo:
    info = DATASETS.get(name.strip().lower()) if isinstance(name, str) else None
    if info is None:
        raise DataError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}")
    return info


def _formats(info: DatasetInfo, fmt: str | None) -> list[str]:
    if fmt is None:
        return list(info.formats)
    if fmt not in info.formats:
        raise DataError(f"dataset {info.name} has no {fmt!r} format; use one of: {', '.join(info.formats)}")
    return [fmt]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of: {', '.join(SPLITS)}")


def _files(info: DatasetInfo, fmt: str, splits: tuple[str, ...] = SPLITS) -> list[DataFile]:
    return [f for split in splits for f in info.formats[fmt][split]]


# ---------------------------------------------------------------------------------------------
# Verification

_MD5SUMS_LINE = re.compile(r"^([0-9a-fA-F]{32}) [ *](.+)$")


def _read_md5sums(data_dir: Path) -> dict[str, str]:
    """Sums from data_dir/MD5SUMS (filename -> md5), or {} when there is none."""
    path = data_dir / MD5SUMS_NAME
    if not path.is_file():
        return {}
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}; fix its permissions or delete it") from e
    sums: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = _MD5SUMS_LINE.match(line.rstrip("\r"))
        if m is None:
            raise DataError(
                f"{path} line {lineno} is not `<md5>  <filename>`; fix it "
                "(regenerate with `md5sum FILES > MD5SUMS`) or delete MD5SUMS"
            )
        name = m.group(2).strip()
        sums[name.removeprefix("./")] = m.group(1).lower()
    return sums


def _expected(f: DataFile, sums: dict[str, str]) -> tuple[str, int | None, bool]:
    """(md5, size, official) for a file; a MD5SUMS entry overrides the official table."""
    custom = sums.get(f.name)
    if custom is not None and custom != f.md5:
        # The official size says nothing about a user's own file.
        return custom, None, False
    return f.md5, f.size, True


def _md5_of_file(path: Path) -> str:
    h = hashlib.md5()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _status(path: Path, md5: str, size: int | None, source: str) -> FileStatus:
    if not path.is_file():
        return FileStatus(path, "missing", "not found", md5)
    try:
        actual_size = path.stat().st_size
        # A size mismatch settles it without reading the file.
        if size is not None and actual_size < size:
            return FileStatus(
                path,
                "partial",
                f"{actual_size} bytes, {source} size is {size} (truncated)",
                md5,
            )
        if size is not None and actual_size != size:
            return FileStatus(path, "corrupt", f"{actual_size} bytes, {source} size is {size}", md5)
        actual = _md5_of_file(path)
    except OSError as e:
        return FileStatus(path, "corrupt", f"cannot read it: {e}", md5)
    if actual != md5:
        return FileStatus(path, "corrupt", f"md5 {actual} != {source} {md5}", md5)
    return FileStatus(path, "ok", f"md5 {md5} ({source})", md5)


def _verify_files(files: list[DataFile], data_dir: Path) -> list[FileStatus]:
    sums = _read_md5sums(data_dir)
    out = []
    for f in files:
        md5, size, official = _expected(f, sums)
        out.append(_status(data_dir / f.name, md5, size, "official" if official else MD5SUMS_NAME))
    return out


def verify(dataset: str, data_dir: Path, fmt: str | None = None) -> list[FileStatus]:
    """Status of every file of the dataset (fmt None: all its formats); reads, never writes."""
    info = get_dataset(dataset)
    data_dir = Path(data_dir)
    files = [f for fm in _formats(info, fmt) for f in _files(info, fm)]
    return _verify_files(files, data_dir)


_OFFICIAL_MD5 = {
    f.name: f.md5 for info in DATASETS.values() for by_split in info.formats.values() for pair in by_split.values() for f in pair
}


def _fix_hint(name: str, md5: str) -> str:
    if _OFFICIAL_MD5.get(name) == md5:
        return f"delete it and run `{FETCH_HINT}`"
    # Only the official bytes can be downloaded; a user's own file has to be restored by hand.
    return f"restore the file {MD5SUMS_NAME} describes, or fix that {MD5SUMS_NAME} line"


def file_problem(st: FileStatus) -> str:
    """One-line description of a file that does not verify, with the fix."""
    if st.state == "missing":
        return f"{st.path.name} is missing from {st.path.parent}"
    what = "truncated" if st.state == "partial" else "corrupt"
    return f"{st.path.name} in {st.path.parent} is {what} ({st.detail}); {_fix_hint(st.path.name, st.expected_md5)}"


# ---------------------------------------------------------------------------------------------
# Download


def _download_hint(data_dir: Path) -> str:
    return f"check the network, set --mirror / {MIRROR_ENV}, or copy the official files into {data_dir}"


def _download_one(
    url: str,
    dest: Path,
    md5: str,
    size: int | None,
    progress: Callable[[str, int, int | None], None] | None,
) -> None:
    """Stream url into a .part file beside dest; only a file with the right md5 gets dest's name."""
    name = dest.name
    # A unique name (O_EXCL) so two concurrent fetches cannot write into the same .part file;
    # os.open's mode lets the umask apply, unlike tempfile's 0600.
    tmp = dest.with_name(f"{name}.{secrets.token_hex(4)}.part")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:
        raise DataError(f"cannot write into {dest.parent}: {e}; pass a writable --data-dir or set {DATA_DIR_ENV}") from e
    try:
        h = hashlib.md5()
        done = 0
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as resp:
                    length_header = resp.headers.get("Content-Length")
                    announced = int(length_header) if length_header and length_header.isdigit() else None
                    total = announced if announced is not None else size
                    if progress is not None:
                        progress(name, 0, total)
                    while chunk := resp.read(_CHUNK):
                        out.write(chunk)
                        h.update(chunk)
                        done += len(chunk)
                        if progress is not None:
                            progress(name, done, total)
            except (OSError, http.client.HTTPException, ValueError) as e:
                # HTTPError's str has the status code; a plain URLError's reason is the useful part.
                plain_url_error = isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError)
                reason = e.reason if plain_url_error else e
                raise DataError(f"cannot download {url}: {reason or type(e).__name__}; {_download_hint(dest.parent)}") from e
            out.flush()
            # Durable before the rename, so a crash cannot leave a short file under the final name.
            os.fsync(out.fileno())
        # http.client does not raise when the server closes before Content-Length bytes.
        if announced is not None and done < announced:
            raise DataError(
                f"download of {url} was cut short ({done} of {announced} bytes); try again, or {_download_hint(dest.parent)}"
            )
        actual = h.hexdigest()
        if actual != md5:
            if size is not None and done < size:
                what = f"a truncated file ({done} bytes, official size {size})"
            else:
                what = f"a corrupted file (md5 {actual} != {md5}, {done} bytes)"
            raise DataError(f"{url} returned {what}; nothing was saved: try again, or {_download_hint(dest.parent)}")
        os.replace(tmp, dest)
    except BaseException:
        # Also on Ctrl-C: no .part litter, and dest was never touched.
        tmp.unlink(missing_ok=True)
        raise


def fetch(
    dataset: str,
    data_dir: Path,
    fmt: str = "npz",
    mirror: str | None = None,
    progress: Callable[[str, int, int | None], None] | None = None,
) -> list[Path]:
    """Download the files of one format that are missing or do not verify; return all its paths.

    Files that already verify are not touched and cost no network access.
    """
    info = get_dataset(dataset)
    (fmt,) = _formats(info, fmt)
    data_dir = Path(data_dir)
    files = _files(info, fmt)
    statuses = _verify_files(files, data_dir)
    todo = [(f, st) for f, st in zip(files, statuses, strict=True) if st.state != "ok"]
    if not todo:
        return [st.path for st in statuses]
    sums = _read_md5sums(data_dir)
    for f, _st in todo:
        _md5, _size, official = _expected(f, sums)
        if not official:
            # A mirror only has the official bytes, which can never match a custom sum.
            raise DataError(
                f"{f.name} is missing or wrong in {data_dir}, and {data_dir / MD5SUMS_NAME} "
                "expects a non-official md5 for it, so it cannot be downloaded; restore the file "
                "or remove its line from MD5SUMS"
            )
    base = resolve_mirror(mirror)
    # Folders made here are removed again if nothing lands in them (e.g. no network).
    made = [p for p in (data_dir, *data_dir.parents) if not p.exists()]
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create data folder {data_dir}: {e}; pass a writable --data-dir or set {DATA_DIR_ENV}") from e
    try:
        for f, st in todo:
            _download_one(f"{base}/{info.name}/{f.name}", st.path, f.md5, f.size, progress)
    except BaseException:
        for p in made:
            try:
                p.rmdir()
            except OSError:
                break  # not empty: keep it and everything above it
        raise
    return [st.path for st in statuses]


# ---------------------------------------------------------------------------------------------
# Loading


def _read_verified(path: Path, md5: str, source: str, max_bytes: int) -> bytes:
    """The file's bytes, hashed as read, so what gets parsed is exactly what was checked. These are the
    compressed bytes (parsing streams from them, never decompressing the whole), and at most `max_bytes`:
    what the split would take stored uncompressed at 8 bytes a value."""
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise DataError(
                f"{path.name} in {path.parent} is {size:,} bytes, more than its split can take ({max_bytes:,}); "
                f"{_fix_hint(path.name, md5)}"
            )
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}; check the file and its permissions") from e
    actual = hashlib.md5(data).hexdigest()
    if actual != md5:
        raise DataError(f"{path.name} in {path.parent} is corrupt (md5 {actual} != {source} {md5}); {_fix_hint(path.name, md5)}")
    return data


def _malformed(path: Path, why: str) -> DataError:
    if path.name in _OFFICIAL_MD5:
        fix = f"replace it with the official file (delete it and run `{FETCH_HINT}`)"
    else:  # a user's own input to predict: theirs to fix, never a file to delete or download
        fix = "give pictures, or an .npz (arr_0) or idx file of 28x28 uint8 images (labels: whole numbers)"
    return DataError(f"{path.name} in {path.parent} is malformed ({why}); {fix}")


def _read_exactly(stream: BinaryIO, n: int) -> tuple[np.ndarray, int]:
    """Up to n bytes of the stream into one array (no second copy), and how many there were."""
    buf = np.empty(n, dtype=np.uint8)
    view, got = memoryview(buf), 0
    while got < n:
        k = stream.readinto(view[got : got + (_CHUNK << 4)])
        if not k:
            break
        got += k
    return buf, got


# Values per item (bytes in an idx file): an image is 28 x 28, a label one.
_ITEM = {True: IMAGE_SHAPE[0] * IMAGE_SHAPE[1], False: 1}


def _parse_npz(path: Path, fileobj: BinaryIO, images: bool, limit: int, too_many: Callable[[int], DataError]) -> np.ndarray:
    """`arr_0` of an npz file: its .npy header (dtype, shape, count) is checked before its data is read,
    and exactly that much data is read. Nothing is unpickled: an object array is refused."""
    from numpy.lib import format as npy

    what = "images" if images else "labels"
    try:
        with zipfile.ZipFile(fileobj) as zf:
            if "arr_0.npy" not in zf.namelist():
                found = [n.removesuffix(".npy") for n in zf.namelist()[:10]]
                raise _malformed(path, f"no array arr_0, found {found}")
            with zf.open("arr_0.npy") as member:
                version = npy.read_magic(member)
                if version == (1, 0):
                    shape, fortran, dtype = npy.read_array_header_1_0(member)
                elif version == (2, 0):
                    shape, fortran, dtype = npy.read_array_header_2_0(member)
                else:
                    raise _malformed(path, f"arr_0 is .npy format {version[0]}.{version[1]}, expected 1.0 or 2.0")
                if dtype.hasobject:
                    raise _malformed(path, f"arr_0 holds Python objects ({dtype}), which are never unpickled")
                if dtype.kind not in "iu":
                    raise _malformed(path, f"{what} are {dtype}, expected {'uint8 0..255' if images else 'integers'}")
                if (images and (len(shape) != 3 or shape[1:] != IMAGE_SHAPE)) or (not images and len(shape) != 1):
                    raise _malformed(path, f"{what} have shape {shape}, expected {'(N, 28, 28)' if images else '(N,)'}")
                if shape[0] > limit:
                    raise too_many(shape[0])
                n_bytes = shape[0] * _ITEM[images] * dtype.itemsize
                buf, got = _read_exactly(member, n_bytes)
                if got < n_bytes:
                    raise _malformed(path, f"arr_0's header says {shape}, but its data ends after {got} of {n_bytes} bytes")
                if member.read(1):  # also reaches the end of the member, where zipfile checks its CRC
                    raise _malformed(path, f"arr_0 has more data than its header's {shape}")
    except DataError:
        raise
    except (
        zipfile.BadZipFile,
        ValueError,
        OSError,
        EOFError,
        KeyError,
        zlib.error,
        lzma.LZMAError,
        RuntimeError,  # an encrypted member
        NotImplementedError,  # a compression method zipfile lacks
    ) as e:
        raise _malformed(path, f"not a valid npz file: {one_line(e, 160)}") from None
    return buf.view(dtype).reshape(shape, order="F" if fortran else "C")


def _parse_idx(
    path: Path, stream: BinaryIO, images: bool, limit: int, too_many: Callable[[int], DataError], gzipped: bool = True
) -> np.ndarray:
    """An idx file, streamed: the header first, then exactly the body it announces, and nothing after."""
    magic = _IDX_IMAGES_MAGIC if images else _IDX_LABELS_MAGIC
    header_len = 16 if images else 8
    try:
        header = stream.read(header_len)
        if len(header) < header_len:
            raise _malformed(path, f"{len(header)} bytes is too short for an idx header")
        fields = struct.unpack(f">{header_len // 4}I", header)
        if fields[0] != magic:
            raise _malformed(path, f"idx magic {fields[0]}, expected {magic}")
        n = fields[1]
        if images and tuple(fields[2:]) != IMAGE_SHAPE:
            raise _malformed(path, f"images are {fields[2]}x{fields[3]}, expected 28x28")
        if n > limit:
            raise too_many(n)
        n_bytes = n * _ITEM[images]
        arr, got = _read_exactly(stream, n_bytes)
        if got < n_bytes:
            raise _malformed(path, f"header says {n} items but the body has {got} bytes")
        if stream.read(1):
            raise _malformed(path, f"header says {n} items but the body has more than {n_bytes} bytes")
    except DataError:
        raise
    except (OSError, EOFError, zlib.error) as e:
        kind = "gzip" if gzipped else "idx"
        raise _malformed(path, f"not a valid {kind} file: {one_line(e, 160)}") from None
    return arr.reshape((n, *IMAGE_SHAPE)) if images else arr


def _as_images(path: Path, arr: np.ndarray) -> np.ndarray:
    if arr.ndim != 3 or arr.shape[1:] != IMAGE_SHAPE:
        raise _malformed(path, f"images have shape {arr.shape}, expected (N, 28, 28)")
    if arr.dtype != np.uint8:
        # Accept a user's subset saved with a wider integer type, as long as it is 0..255.
        if arr.dtype.kind not in "iu" or (arr.size and (arr.min() < 0 or arr.max() > 255)):
            raise _malformed(path, f"images are {arr.dtype}, expected uint8 0..255")
        arr = arr.astype(np.uint8)
    return np.ascontiguousarray(arr)


def _as_labels(path: Path, arr: np.ndarray, n_classes: int) -> np.ndarray:
    if arr.ndim != 1:
        raise _malformed(path, f"labels have shape {arr.shape}, expected (N,)")
    if arr.dtype.kind not in "iu":
        raise _malformed(path, f"labels are {arr.dtype}, expected integers")
    labels = arr.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise _malformed(
            path,
            f"labels run {labels.min()}..{labels.max()}, expected 0..{n_classes - 1}",
        )
    return labels


def _load_files(info: DatasetInfo, fmt: str, split: str, data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    sums = _read_md5sums(data_dir)
    img_file, lbl_file = info.formats[fmt][split]
    count = info.counts[split]
    arrays = []
    for f, is_images in ((img_file, True), (lbl_file, False)):
        md5, _size, official = _expected(f, sums)
        path = data_dir / f.name
        data = _read_verified(path, md5, "official" if official else MD5SUMS_NAME, count * _ITEM[is_images] * 8 + (1 << 20))

        def too_many(n: int, path: Path = path, what: str = "images" if is_images else "labels") -> DataError:
            return _malformed(path, f"its header says {n:,} {what}; the {info.name} {split} split has {count:,}")

        if fmt == "npz":
            arr = _parse_npz(path, io.BytesIO(data), is_images, count, too_many)
        else:
            with gzip.GzipFile(fileobj=io.BytesIO(data), mode="rb") as gz:
                arr = _parse_idx(path, gz, is_images, count, too_many)
        del data  # the compressed bytes, before the next file's
        if is_images:
            arrays.append(_as_images(path, arr))
        else:
            arrays.append(_as_labels(path, arr, info.n_classes))
    images, labels = arrays
    if len(images) != len(labels):
        raise DataError(
            f"{img_file.name} has {len(images)} images but {lbl_file.name} has {len(labels)} "
            f"labels in {data_dir}; the two files must come from the same split and release"
        )
    if len(images) == 0:
        raise DataError(f"{img_file.name} in {data_dir} holds no images; use a non-empty file")
    return images, labels


def load_split(
    dataset: str,
    split: str,
    data_dir: Path,
    fmt: str | None = None,
    download: bool = True,
    mirror: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels int64 (N,)) of one split, verified before parsing.

    fmt None: npz if its files verify, else idx if those do, else (download=True) fetch npz.
    Only missing files are downloaded here; a present file that does not verify is an error
    (it might be the user's own data), and `fetch` is the explicit way to replace it.
    """
    info = get_dataset(dataset)
    _check_split(split)
    data_dir = Path(data_dir)
    candidates = _formats(info, fmt)
    problems: list[FileStatus] = []
    for fm in candidates:
        statuses = _verify_files(_files(info, fm, (split,)), data_dir)
        if all(st.state == "ok" for st in statuses):
            return _load_files(info, fm, split, data_dir)
        problems.extend(st for st in statuses if st.state != "ok")

    bad = [st for st in problems if st.state != "missing"]
    want = fmt or "npz"
    # Downloading is only for files that are simply absent; never overwrite a bad file here
    # (fetch takes the whole format, so the other split's files count too).
    bad_in_want = [st for st in _verify_files(_files(info, want), data_dir) if st.state not in ("ok", "missing")]
    if bad_in_want or not download:
        first = (bad_in_want or bad or problems)[0]
        if first.state == "missing":
            raise DataError(
                f"{info.name} {split} data not found in {data_dir} "
                f"({', '.join(sorted({st.path.name for st in problems}))} missing); "
                f"run `{FETCH_HINT}` or copy the official files there"
            )
        raise DataError(file_problem(first))
    fetch(info.name, data_dir, fmt=want, mirror=mirror)
    return _load_files(info, want, split, data_dir)


# ---------------------------------------------------------------------------------------------
# Stratified index selection


# `predict` reads at most this many images (or labels) from one array file unless told more
# (`--max-images`): 100,000 images are 78 MB; a header is free to say four billion.
DEFAULT_MAX_IMAGES = 100_000


def read_array_file(path: Path, *, images: bool, limit: int = DEFAULT_MAX_IMAGES) -> np.ndarray:
    """Images (N, 28, 28) or labels (N,) from a user's own file: an `.npz` (its `arr_0`), or an idx
    file, gzipped or not, streamed. No checksum: this is for inputs to predict, not the data sets.
    At most `limit` of them, checked from the file's header before its body is read."""
    what = "images" if images else "labels"

    def too_many(n: int) -> DataError:
        return DataError(
            f"{path}: holds {n:,} {what}; predict reads at most {limit:,} from one file: "
            f"pass --max-images {n} to read them all, or split the file"
        )

    try:
        fh = path.open("rb")
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    with fh:
        if path.suffix == ".npz":
            arr = _parse_npz(path, fh, images, limit, too_many)
        else:
            try:
                gzipped = fh.peek(2)[:2] == b"\x1f\x8b"
            except OSError as e:
                raise DataError(f"cannot read {path}: {e.strerror}") from None
            if gzipped:
                with gzip.GzipFile(fileobj=fh, mode="rb") as gz:
                    arr = _parse_idx(path, gz, images, limit, too_many)
            else:
                arr = _parse_idx(path, fh, images, limit, too_many, gzipped=False)
    return _as_images(path, arr) if images else _as_labels(path, arr, 10**6)
