"""n2n's webdataset tars as periodic byte layouts: a whole tar written from, and read into, numpy arrays.

A tar is a run of 512-byte blocks: each member is one header block, then its data padded to whole
blocks. n2n writes a sample per row, three members in webdataset's order (sorted): ``ROW.key.txt``,
``ROW.latent.npy``, ``ROW.sub.cls``. A key of 1..512 bytes and a sub take one data block each and
a latent always the same number, so every row occupies the same ``stride`` bytes and row i starts
at ``i * stride``: the tar is periodic. Then a shard is one buffer, each column a strided view of
it, and nothing is done once per member in Python (webdataset and tarfile cost ~90 us a row).

``pack`` writes the bytes that webdataset's ``TarWriter(mtime=0)`` writes for the same rows
(tested), so every tool reads these tars as before. ``unpack`` trusts a strided view only after
checking, for every row, what decides the values it returns (see its docstring) and the end of the
archive; anything else (a tar another tool wrote, a key over 512 bytes, damage) makes it return
None, and the caller reads the tar member by member, as strictly as ever.
"""

from __future__ import annotations

import io
import threading
from functools import cache

import numpy as np

BLOCK = 512
RECORD = 20 * BLOCK  # tarfile pads an archive to whole records
FIELDS = ("key.txt", "latent.npy", "sub.cls")  # a sample's members, in the order TarWriter writes them
NAME_DIGITS = 12  # a sample's __key__: its global row index, zero-padded
MAX_SUB_DIGITS = 18  # a longer sub.cls is parsed by the member reader (int64 range)
NAME_BYTES = 24  # the row number, the longest field (".latent.npy") and its NUL: where a name must end
# Header fields (POSIX ustar), as byte ranges of a header block.
SIZE, CHKSUM, TYPE, PREFIX = slice(124, 136), slice(148, 156), 156, 345
SIZE_WORDS = slice(120, 136)  # the size and, before it, the end of the gid: 8-byte aligned


_NPY_HEADERS = threading.Lock()


def load_npy(member: bytes) -> np.ndarray:
    """A .npy member's array, never a pickle. numpy parses the header with ``ast.literal_eval``,
    which CPython 3.11 can fail in two threads at once ("AST constructor recursion depth
    mismatch", python/cpython#106905); tars are read on a thread per core, so one parse at a time."""
    with _NPY_HEADERS:
        return np.load(io.BytesIO(member), allow_pickle=False)


def _blocks(size: int) -> int:
    return -(-size // BLOCK)


class Offsets:
    """Where each member's header and data start within a row, for latents of ``latent_bytes`` (.npy)."""

    def __init__(self, latent_bytes: int):
        self.key_header, self.key_data = 0, BLOCK
        self.latent_header, self.latent_data = 2 * BLOCK, 3 * BLOCK
        self.sub_header = self.latent_data + _blocks(latent_bytes) * BLOCK
        self.sub_data = self.sub_header + BLOCK
        self.stride = self.sub_data + BLOCK
        self.headers = (self.key_header, self.latent_header, self.sub_header)


def archive_bytes(rows: int, stride: int) -> int:
    """The rows, tarfile's two zero blocks that end an archive, and padding to a whole record."""
    return -(-(rows * stride + 2 * BLOCK) // RECORD) * RECORD


def _digits(values: np.ndarray, width: int, base: int) -> np.ndarray:
    """ASCII digits [rows, width] of non-negative integers, zero-padded (as tar and __key__ write them)."""
    powers = base ** np.arange(width - 1, -1, -1, dtype=np.int64)
    return (values[:, None] // powers % base + ord("0")).astype(np.uint8)


def _number(field: np.ndarray, base: int) -> np.ndarray | None:
    """Integers of ASCII digit fields [rows, width]; None if any byte is not a digit of ``base``."""
    digits = field.astype(np.int64) - ord("0")
    if digits.size and (digits.min() < 0 or digits.max() >= base):
        return None
    return digits @ base ** np.arange(field.shape[1] - 1, -1, -1, dtype=np.int64)


@cache
def _four_digits() -> np.ndarray:
    """The low four digits of row numbers, "0000" to "9999", as 4-byte words: looked up, not divided out."""
    return np.frombuffer(b"".join(f"{i:04d}".encode() for i in range(10_000)), np.uint32)


def _names(start: int, rows: int, field: str) -> np.ndarray:
    """The first NAME_BYTES of the name fields [rows, NAME_BYTES] of ``field``'s members of rows
    start..: the zero-padded row number (webdataset's ``__key__``), the field, then NULs. Rows are
    consecutive, so the high eight digits take a few values, each formatted once."""
    high, low = np.divmod(np.arange(start, start + rows, dtype=np.int64), 10_000)
    first, last = int(high[0]), int(high[-1])
    highs = np.frombuffer(b"".join(f"{h:08d}".encode() for h in range(first, last + 1)), np.uint64)
    suffix = f".{field}".encode().ljust(NAME_BYTES - NAME_DIGITS, b"\0")
    names = np.empty((rows, NAME_BYTES), np.uint8)
    names[:, :8].view(np.uint64)[:, 0] = highs[high - first]
    names[:, 8:NAME_DIGITS].view(np.uint32)[:, 0] = _four_digits()[low]
    names[:, NAME_DIGITS:] = np.frombuffer(suffix, np.uint8)
    return names


def _checksums(headers: np.ndarray) -> np.ndarray:
    """tar's header checksum: the sum of the header's bytes with its checksum field read as spaces."""
    return headers.sum(axis=1, dtype=np.uint32) - headers[:, CHKSUM].sum(axis=1, dtype=np.uint32) + 8 * ord(" ")


@cache
def _sample(dim: int, dtype: str) -> bytes:
    """One row as TarWriter writes it (key "x", sub 0, zeros): the template every packed row starts from."""
    from webdataset import TarWriter  # imports torch: only pay for it when writing tars

    stream = io.BytesIO()
    writer = TarWriter(stream, mtime=0)  # an integer mtime: plain ustar headers, no pax records
    writer.write({"__key__": "0" * NAME_DIGITS, "key.txt": "x", "sub.cls": 0, "latent.npy": np.zeros(dim, dtype)})
    writer.close()
    return stream.getvalue()


def pack(start: int, keys: np.ndarray, sub: np.ndarray, latents: np.ndarray) -> np.ndarray | None:
    """The whole tar of rows start.. as bytes (uint8), or None where the rows are not periodic."""
    encoded = _utf8(keys)
    key_sizes = np.strings.str_len(encoded)
    subs = np.asarray(sub, dtype=np.int64).astype("S20")  # str(int): what TarWriter writes for .cls
    if not len(keys) or key_sizes.min() < 1 or encoded.itemsize > BLOCK:
        return None
    dim, dtype = latents.shape[1], latents.dtype
    npy = len(_npy_header(dim, dtype.str))
    at = Offsets(npy + dim * dtype.itemsize)
    out = np.empty(archive_bytes(len(keys), at.stride), np.uint8)
    out[len(keys) * at.stride :] = 0
    rows = out[: len(keys) * at.stride].reshape(len(keys), at.stride)
    template = np.frombuffer(_sample(dim, dtype.str), np.uint8)[: at.stride]
    rows[:] = template
    rows[:, at.key_data : at.key_data + encoded.itemsize] = encoded.view(np.uint8).reshape(len(keys), -1)
    rows[:, at.sub_data : at.sub_data + subs.itemsize] = subs.view(np.uint8).reshape(len(keys), -1)
    rows[:, at.latent_data + npy : at.latent_data + npy + dim * dtype.itemsize] = (
        np.ascontiguousarray(latents).view(np.uint8))
    for header, field in zip(at.headers, FIELDS, strict=True):
        rows[:, header : header + NAME_BYTES] = _names(start, len(keys), field)  # then NULs, as in the template
    for header, sizes in ((at.key_header, key_sizes), (at.sub_header, np.strings.str_len(subs))):
        rows[:, header + SIZE.start : header + SIZE.stop - 1] = _digits(sizes, 11, 8)
    for header in at.headers:  # the template's checksum, less its bytes that changed, plus each row's
        block, original = rows[:, header : header + BLOCK], template[header : header + BLOCK]
        unchanged = int(_checksums(original[None])[0]) - int(original[:NAME_BYTES].sum()) - int(original[SIZE].sum())
        checksums = unchanged + block[:, :NAME_BYTES].sum(axis=1, dtype=np.int64) + block[:, SIZE].sum(axis=1)
        block[:, CHKSUM.start : CHKSUM.start + 6] = _digits(checksums, 6, 8)
    return out


def _utf8(keys: np.ndarray) -> np.ndarray:
    """Keys as UTF-8 bytes ('S'): a cast where all are ASCII (the usual case, and much faster)."""
    text = np.ascontiguousarray(keys, dtype=str)
    if text.itemsize and text.view(np.uint32).max(initial=0) < 128:
        return text.astype(f"S{text.itemsize // 4}")
    return np.char.encode(text, "utf-8")


@cache
def _npy_header(dim: int, dtype: str) -> bytes:
    """The .npy header numpy writes before a latent of ``dim`` ``dtype`` values."""
    stream = io.BytesIO()
    np.lib.format.write_array(stream, np.zeros(dim, dtype))
    return stream.getvalue()[: -dim * np.dtype(dtype).itemsize]


def _first_latent(buffer: np.ndarray, dim: int, dtype: np.dtype) -> bytes | None:
    """The .npy header of row 0's latent, if that member is where a periodic tar has it and holds
    a (dim,) ``dtype`` array; every other row must then carry the same header."""
    at = Offsets(0)
    if len(buffer) < at.latent_data or buffer[at.latent_header + SIZE.stop - 1]:
        return None
    size = _number(buffer[None, at.latent_header + SIZE.start : at.latent_header + SIZE.stop - 1], 8)
    if size is None or len(buffer) < at.latent_data + int(size[0]):
        return None
    member = buffer[at.latent_data : at.latent_data + int(size[0])].tobytes()
    try:
        vector = load_npy(member)
    except (ValueError, EOFError):
        return None
    if vector.shape != (dim,) or vector.dtype != dtype:
        return None
    return member[: len(member) - dim * dtype.itemsize]


def unpack(
    buffer: np.ndarray, start: int, rows: int, dim: int, dtype: np.dtype, *, latents: bool = True, columns: bool = True
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None] | None:
    """(keys, sub, latents) of the tar in ``buffer`` (uint8) holding rows start..start+rows, each
    None unless asked for; None for the whole if the tar is not a periodic n2n tar (see the module).
    The latents are a strided view of ``buffer``: copy them.

    What is checked is what decides the values returned, for every row: reading latents, that
    each latent member is where the layout puts it (its name, type, no prefix), of row 0's size,
    after row 0's .npy header; reading the columns, the same of every member, each header's
    checksum and the key and sub sizes. Then the archive must end where the rows do.
    """
    npy = _first_latent(buffer, dim, dtype)
    if npy is None:
        return None
    at = Offsets(len(npy) + dim * dtype.itemsize)
    end = rows * at.stride
    if len(buffer) < end + 2 * BLOCK or buffer[end : end + 2 * BLOCK].any():
        return None  # truncated, or more members than rows
    table = buffer[:end].reshape(rows, at.stride)
    latent_header = table[:, at.latent_header : at.latent_header + BLOCK]
    if (not _placed(latent_header, start, "latent.npy")
            or not _same(latent_header[:, SIZE_WORDS], latent_header[0, SIZE_WORDS])
            or not _same(table[:, at.latent_data : at.latent_data + len(npy)], np.frombuffer(npy, np.uint8))):
        return None
    out_latents = None
    if latents:
        data = at.latent_data + len(npy)
        out_latents = table[:, data : data + dim * dtype.itemsize].view(dtype)
    if not columns:
        return None, None, out_latents
    headers = [table[:, header : header + BLOCK] for header in at.headers]
    if not all(_placed(block, start, field) and _checked(block) for block, field in zip(headers, FIELDS, strict=True)):
        return None
    key_sizes, sub_sizes = _sizes(headers[0], BLOCK), _sizes(headers[2], MAX_SUB_DIGITS)
    if key_sizes is None or sub_sizes is None:
        return None
    keys = _text(table[:, at.key_data : at.key_data + BLOCK], key_sizes)
    sub = _integers(table[:, at.sub_data : at.sub_data + MAX_SUB_DIGITS], sub_sizes)
    if keys is None or sub is None:
        return None
    return keys, sub, out_latents


def _same(values: np.ndarray, expected: np.ndarray) -> bool:
    """Whether every row of ``values`` [rows, n bytes] equals ``expected``, compared 8 bytes at a time."""
    if values.shape[1] % 8:
        return bool((values == expected).all())
    return bool((values.view(np.uint64) == expected.view(np.uint64)).all())


def _placed(headers: np.ndarray, start: int, field: str) -> bool:
    """Whether each row's header block [rows, 512] names that row's ``field`` member (its row number,
    the field, then NUL), with no ustar prefix before the name, as a regular file."""
    names = _names(start, len(headers), field)
    return (np.array_equal(headers[:, :NAME_BYTES].view(np.uint64), names.view(np.uint64))
            and ((headers[:, TYPE] == ord("0")) | (headers[:, TYPE] == 0)).all() and not headers[:, PREFIX].any())


def _checked(headers: np.ndarray) -> bool:
    """Whether each header block [rows, 512] carries its checksum, as tarfile writes it ("%06o\0 ")."""
    stored = _number(headers[:, CHKSUM.start : CHKSUM.start + 6], 8)
    total = _checksums(headers)
    ends = headers[:, CHKSUM.stop - 2 : CHKSUM.stop]
    return stored is not None and np.array_equal(stored, total) and (ends == np.array([0, ord(" ")], np.uint8)).all()


def _sizes(headers: np.ndarray, most: int) -> np.ndarray | None:
    """Member sizes ("%011o\0") of header blocks [rows, 512]; None unless each is 1..``most`` bytes."""
    sizes = _number(headers[:, SIZE.start : SIZE.stop - 1], 8)
    if sizes is None or headers[:, SIZE.stop - 1].any() or sizes.min() < 1 or sizes.max() > most:
        return None
    return sizes


def _text(data: np.ndarray, sizes: np.ndarray) -> np.ndarray | None:
    """UTF-8 members of ``sizes`` bytes as 'U' strings; None if one holds a NUL at its end or bad UTF-8."""
    width = int(sizes.max())
    encoded = np.ascontiguousarray(data[:, :width]).view(f"S{width}").ravel()
    if not np.array_equal(np.strings.str_len(encoded), sizes):  # padding inside the size, or bytes after it
        return None
    try:
        return np.strings.decode(encoded, "utf-8")
    except UnicodeDecodeError:
        return None


def _integers(data: np.ndarray, sizes: np.ndarray) -> np.ndarray | None:
    """Decimal members (an optional '-' then digits) of ``sizes`` bytes as int64; None for any other text."""
    width = int(sizes.max())
    chars = data[:, :width].astype(np.int64)
    position = np.arange(width)
    inside = position < sizes[:, None]
    negative = chars[:, 0] == ord("-")
    digit = inside & ~((position == 0) & negative[:, None])
    values = chars - ord("0")
    if ((values < 0) | (values > 9))[digit].any() or (negative & (sizes == 1)).any():
        return None
    powers = np.where(digit, 10 ** np.clip(sizes[:, None] - 1 - position, 0, None), 0)
    magnitude = (np.where(digit, values, 0) * powers).sum(axis=1)
    return np.where(negative, -magnitude, magnitude)
