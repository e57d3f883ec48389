"""Tensor records: every loaded tensor's name, dtype, shape, sha256 and a dtype-tolerant row sketch.

`guard scan` records every tensor the loader loads (`formats.open_source`); `guard verify-checkpoint`
checks a checkpoint against them (`check_tensors`). Same dtype: the bytes must hash to the recorded
sha256 (a re-shard or a same-dtype re-save is byte-identical; anything else is tampering). Another
float dtype: a lossless widening (bf16 -> fp32) is narrowed back and must hash to the record exactly;
a narrowing or a cross cast (fp32 -> bf16, bf16 -> fp16) is judged through the sketch, within the
rounding of round-to-nearest to the new dtype. GGUF tensors must be byte-identical.

The sketch of a tensor is one row of 6 float32 numbers per row of its row view (every axis but the
last flattened; a 1-D tensor has one row per element): 4 keyed random ±1 projections, the row's
absolute sum A and its L2 norm N, computed in float64. Rounding each element to a dtype of unit
roundoff u moves it by e_i with |e_i| <= u|x_i| (+ half the dtype's smallest subnormal), so

    |ΔA| <= u·A,   |ΔN| <= u·N,   |Δp| <= min(u·A, 10·u·N)

the last because Δp = Σ r_i e_i with r_i independent random signs (keyed, unknown to whoever
re-saved the model): Hoeffding gives P(|Δp| > 10·u·N) <= 2·exp(-50) per projection. Each bound
also allows for the sketch's float32 storage (2^-22 relative) and float64 accumulation. A row
outside any bound changed beyond rounding.

The projections' signs come from SHAKE-256 of two keys. p0 and p1 are keyed by a random nonce
stored in the fingerprint: anyone can check them. p2 and p3 are keyed by HMAC(sign key, nonce) when
the fingerprint is signed (secret to whoever lacks the key), else by the nonce too. So a signed
fingerprint checked without its key still compares two projections, A and N; an attacker who
reads the fingerprint knows p0/p1's signs, but not p2/p3's when it is signed (docs/fingerprint.md).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from achilles_guard.errors import InputError
from achilles_guard.formats.source import FLOAT_DTYPES, TensorEntry, width_of

__all__ = [
    "DIGEST",
    "SKETCH_TENSOR",
    "TensorRecord",
    "TensorRecords",
    "TensorFinding",
    "TensorCheck",
    "build_records",
    "check_tensors",
    "sketch_entry",
    "sketch_key",
    "hash_entries",
]

DIGEST = "sha256"  # hashlib's SHA-NI path: ~1.5 GB/s a core here, FIPS-approved, no new dependency
SKETCH_TENSOR = "tensors/sketch"  # the fingerprint tensor holding every row sketch, (rows, 6) float32
PROJECTIONS = 4
PUBLIC = 2  # p0, p1: keyed by the stored nonce; p2, p3: by HMAC(sign key, nonce) when signed
FIELDS = PROJECTIONS + 2  # p0..p3, A (absolute sum), N (L2 norm)
HOEFFDING = 10.0  # projection bound in units of u·N
STORE = 2.0**-22  # float32 storage of a sketch value (2^-24) and float64 accumulation, with margin
CHUNK = 1 << 21  # elements per tile of a sketch (16 MiB of float64)
COL_BLOCK = 1 << 16  # columns per sign block (so no row asks for an unbounded sign matrix)
MAX_ROWS_LISTED = 32  # rows named per finding (the count is always exact)
MAX_RECORDS = 1 << 24  # a fingerprint claiming more tensor records than this is corrupt
RANKED_TOP = 1024  # neurons of each ranking whose rows make a change `ranked`
WORKERS = max(1, min(8, os.cpu_count() or 1))

# unit roundoff (half an ulp at 1) and half the smallest subnormal of each float dtype: round-to-nearest error
_ROUNDING = {"F64": (2.0**-53, 2.0**-1075), "F32": (2.0**-24, 2.0**-150), "BF16": (2.0**-8, 2.0**-134),
             "F16": (2.0**-11, 2.0**-25)}
# lossless widenings: every value of the key dtype is exactly a value of each dtype listed
_WIDER = {"F16": ("F32", "F64"), "BF16": ("F32", "F64"), "F32": ("F64",)}
_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class TensorRecord:
    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str
    sha256: str
    sketch_start: int  # first row in the sketch tensor; -1: no sketch (not a float dtype)
    rows: int  # rows of the row view


@dataclass(frozen=True)
class TensorRecords:
    """What the fingerprint stores about every loaded tensor (metadata `tensors` + tensor `tensors/sketch`)."""

    format: str  # "safetensors" | "gguf"
    files: tuple[str, ...]
    records: tuple[TensorRecord, ...]
    sketch: np.ndarray  # (total rows, 6) float32
    nonce: str  # hex
    keyed: bool  # p2, p3 keyed by HMAC(sign key, nonce); else by the nonce, as p0, p1 always are
    ranked: dict  # tensor name -> {row: best rank}

    @property
    def total_bytes(self) -> int:
        return sum(math.prod(r.shape) * _itemsize(r.dtype) for r in self.records if _itemsize(r.dtype))

    def metadata_json(self) -> str:
        return json.dumps(
            {
                "version": 1,
                "digest": DIGEST,
                "format": self.format,
                "files": list(self.files),
                "sketch": {"fields": ["p0", "p1", "p2", "p3", "abs_sum", "l2"], "nonce": self.nonce,
                           "key": "hmac" if self.keyed else "nonce", "rows": int(self.sketch.shape[0]),
                           "sha256": _sketch_sha(self.sketch)},
                "records": [[r.name, r.dtype, list(r.shape), r.file, r.sha256, r.sketch_start, r.rows]
                            for r in self.records],
                "ranked": {name: sorted([row, rank] for row, rank in rows.items())
                           for name, rows in sorted(self.ranked.items())},
            },
            separators=(",", ":"),
        )

    @staticmethod
    def from_metadata(text: str, sketch: np.ndarray | None, where: str) -> "TensorRecords":
        """Parse and bound-check the `tensors` section; InputError (exit 2) on anything malformed."""
        bad = f"fingerprint {where}: malformed tensor records"
        try:
            doc = json.loads(text)
            if doc.get("version") != 1 or doc.get("digest") != DIGEST:
                raise InputError(f"{bad} (version {doc.get('version')!r}, digest {doc.get('digest')!r})")
            raw = doc["records"]
            if not isinstance(raw, list) or len(raw) > MAX_RECORDS:
                raise InputError(f"{bad} (records is not a list of at most {MAX_RECORDS:,})")
            total = 0 if sketch is None else int(sketch.shape[0])
            if sketch is not None and (sketch.ndim != 2 or sketch.shape[1] != FIELDS or sketch.dtype != np.float32):
                got = f"{sketch.dtype} {list(sketch.shape)}"
                raise InputError(f"{bad} (the sketch tensor is {got}, not float32 [n, {FIELDS}])")
            records = []
            for item in raw:
                name, dtype, shape, file, digest, start, rows = item
                shape = tuple(shape)
                if not (isinstance(name, str) and isinstance(dtype, str) and isinstance(file, str)
                        and all(isinstance(d, int) and d >= 0 for d in shape) and len(shape) <= 8
                        and isinstance(digest, str) and len(digest) == 64 and set(digest) <= _HEX
                        and isinstance(start, int) and isinstance(rows, int) and rows >= 0):
                    raise InputError(f"{bad} (entry {str(name)[:80]!r})")
                if rows != _rows(shape):
                    raise InputError(f"{bad} ({name}: {rows} sketch rows for shape {list(shape)})")
                if start != -1 and not (0 <= start and start + rows <= total):
                    raise InputError(f"{bad} ({name}: sketch rows {start}..{start + rows} outside the {total} stored)")
                records.append(TensorRecord(name, dtype, shape, file, digest, start, rows))
            sk = doc["sketch"]
            if sketch is not None and (sk["rows"] != total or sk["sha256"] != _sketch_sha(sketch)):
                # the unsigned fingerprint's own corruption check, as each slice has its sha256
                raise InputError(f"{bad} (the sketch tensor does not match its recorded sha256 / {sk['rows']} rows)")
            nonce = sk["nonce"]
            if not (isinstance(nonce, str) and len(nonce) == 32 and set(nonce) <= _HEX) or sk["key"] not in (
                "hmac", "nonce"
            ):
                raise InputError(f"{bad} (sketch key)")
            ranked = {
                str(name): {int(row): int(rank) for row, rank in rows} for name, rows in doc.get("ranked", {}).items()
            }
            fmt = doc["format"]
            if fmt not in ("safetensors", "gguf"):
                raise InputError(f"{bad} (format {fmt!r})")
            files = tuple(str(f) for f in doc["files"])
        except InputError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError):
            raise InputError(bad) from None
        empty = np.zeros((0, FIELDS), np.float32)
        return TensorRecords(fmt, files, tuple(records), empty if sketch is None else sketch, nonce,
                             sk["key"] == "hmac", ranked)


@dataclass(frozen=True)
class TensorFinding:
    """One tensor that is not what the fingerprint recorded."""

    tensor: str
    file: str
    kind: str  # bytes | beyond-rounding | missing | extra | reshaped | dtype | requantized | format
    detail: str
    rows: tuple[int, ...] = ()  # changed rows of the row view (the first MAX_ROWS_LISTED)
    rows_changed: int | None = None  # how many rows changed; None when the change could not be localized
    rows_total: int = 0
    expected_dtype: str | None = None
    actual_dtype: str | None = None
    expected_shape: tuple[int, ...] | None = None
    actual_shape: tuple[int, ...] | None = None
    ranked_hits: tuple[tuple[int, int], ...] = ()  # (row, rank) of the changed rows the rankings hold
    critical_hits: tuple[int, ...] = ()  # changed rows that are fingerprinted slices
    severity: str = "other"  # critical | ranked | other (set by the verification, which knows the slices)


@dataclass(frozen=True)
class TensorCheck:
    """The whole-model check: what was compared and what differs."""

    findings: tuple[TensorFinding, ...]
    tensors: int  # tensors in the checkpoint
    recorded: int  # tensors in the fingerprint
    identical: int  # byte-identical to the record
    equivalent: int  # another dtype, same values up to rounding
    bytes_hashed: int
    bytes_total: int
    seconds: float
    sketched: int  # tensors whose sketch was computed (dtype changed, or bytes differ)
    keyless: bool = False  # signed fingerprint, no key: p2, p3 unknown; p0, p1, A and N compared

    @property
    def ok(self) -> bool:
        return not self.findings


def _sketch_sha(sketch: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(sketch, dtype="<f4").tobytes()).hexdigest()


def _itemsize(dtype: str) -> int:
    from achilles_guard.formats.source import ST_ITEMSIZE

    return ST_ITEMSIZE.get(dtype, 0)


def _rows(shape: tuple[int, ...]) -> int:
    return 1 if len(shape) == 0 else (shape[0] if len(shape) == 1 else math.prod(shape[:-1]))


def sketch_key(nonce: str, sign_key: bytes | None, *, keyed: bool | None = None) -> tuple[bytes, bytes | None]:
    """(public, secret) keys of the projections' signs: the nonce, and HMAC(sign key, nonce) when signed
    (else the nonce again). keyed True without a sign key: the secret half is unknown (None)."""
    raw = bytes.fromhex(nonce)
    if sign_key is None:
        return raw, (None if keyed else raw)
    return raw, hmac.new(sign_key, b"achilles-guard/sketch\0" + raw, hashlib.sha256).digest()


_SIGNS: dict = {}


def _signs(key: tuple[bytes, bytes | None], width: int, block: int, n: int) -> np.ndarray:
    """(n, 4) ±1 float64 signs of columns [block·COL_BLOCK, +n) for rows of `width` (SHAKE-256, stable forever):
    columns 0..1 from the public key, 2..3 from the secret one (zeros when it is unknown)."""
    k = (key, width, block)
    s = _SIGNS.get(k)
    if s is None:
        s = np.zeros((n, PROJECTIONS), np.float64)
        for half, (part, cols) in enumerate(((key[0], slice(0, PUBLIC)), (key[1], slice(PUBLIC, PROJECTIONS)))):
            if part is None:
                continue
            m = cols.stop - cols.start
            seed = part + f"\0{half}\0{width}\0{block}".encode()
            bits = np.unpackbits(np.frombuffer(hashlib.shake_256(seed).digest((n * m + 7) // 8), np.uint8))
            s[:, cols] = 1.0 - 2.0 * bits[: n * m].reshape(n, m).astype(np.float64)
        if len(_SIGNS) > 64:
            _SIGNS.clear()
        _SIGNS[k] = s
    return s


def sketch_entry(src, entry: TensorEntry, key: tuple[bytes, bytes | None]) -> np.ndarray | None:
    """(rows, 6) float64 sketch of a tensor's values (None for a non-float tensor), in bounded tiles."""
    rows, width = entry.rows, width_of(entry.shape)
    if not src.has_values(entry):
        return None
    out = np.zeros((rows, FIELDS), np.float64)
    for c0 in range(0, width, COL_BLOCK):
        c1 = min(width, c0 + COL_BLOCK)
        signs = _signs(key, width, c0 // COL_BLOCK, c1 - c0)
        step = max(1, CHUNK // (c1 - c0))
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            x = src.rows(entry, r0, r1, c0, c1)  # (r1 - r0, c1 - c0)
            out[r0:r1, :PROJECTIONS] += x @ signs
            out[r0:r1, PROJECTIONS] += np.abs(x).sum(1)
            out[r0:r1, PROJECTIONS + 1] += np.einsum("ij,ij->i", x, x)
    out[:, PROJECTIONS + 1] = np.sqrt(out[:, PROJECTIONS + 1])
    return out


def _sha(src, entry: TensorEntry) -> str:
    view = src.raw(entry)
    try:
        return hashlib.sha256(view).hexdigest()  # hashlib releases the GIL: tensors hash in parallel
    finally:
        view.release()


def hash_entries(src, entries: list[TensorEntry]) -> list[str]:
    """sha256 of every entry's raw bytes, hashed on every core (largest first), in `entries` order."""
    order = sorted(range(len(entries)), key=lambda i: -entries[i].nbytes)
    out: list[str] = [""] * len(entries)
    with ThreadPoolExecutor(WORKERS) as pool:
        for i, digest in zip(order, pool.map(lambda i: _sha(src, entries[i]), order)):
            out[i] = digest
    return out


def build_records(src, *, sign_key: bytes | None = None, ranked: dict | None = None) -> TensorRecords:
    """Record every tensor of a source: one read of its bytes (hash and sketch each tensor on the same pass)."""
    nonce = secrets.token_hex(16)
    key = sketch_key(nonce, sign_key)
    entries = list(src.entries)

    def one(entry: TensorEntry):
        return _sha(src, entry), sketch_entry(src, entry, key)

    order = sorted(range(len(entries)), key=lambda i: -entries[i].nbytes)
    done: dict[int, tuple] = {}
    with ThreadPoolExecutor(WORKERS) as pool:
        for i, res in zip(order, pool.map(lambda i: one(entries[i]), order)):
            done[i] = res
    records, parts, start = [], [], 0
    for i, entry in enumerate(entries):
        digest, sk = done[i]
        if sk is None:
            records.append(TensorRecord(entry.name, entry.dtype, entry.shape, entry.file, digest, -1, entry.rows))
            continue
        records.append(TensorRecord(entry.name, entry.dtype, entry.shape, entry.file, digest, start, entry.rows))
        parts.append(sk.astype(np.float32))
        start += sk.shape[0]
    sketch = np.concatenate(parts) if parts else np.zeros((0, FIELDS), np.float32)
    return TensorRecords(src.kind, tuple(src.files), tuple(records), sketch, nonce, sign_key is not None,
                         dict(ranked or {}))


def _changed_rows(ref: np.ndarray, cur: np.ndarray, width: int, dtype: str | None, *, keyed: bool = True) -> np.ndarray:
    """(rows,) bool: rows whose sketch moved beyond rounding to `dtype` (None: no rounding, values must match).
    keyed False: the secret projections p2, p3 are not comparable (no key); p0, p1, A and N are."""
    ref = ref.astype(np.float64)
    if not keyed:
        ref, cur = ref.copy(), cur.copy()
        ref[:, PUBLIC:PROJECTIONS] = 0.0
        cur[:, PUBLIC:PROJECTIONS] = 0.0
    u, a = _ROUNDING.get(dtype, (0.0, 0.0)) if dtype else (0.0, 0.0)
    A, N = ref[:, PROJECTIONS], ref[:, PROJECTIONS + 1]
    accum = width * 2.0**-52 * A
    absolute = width * a
    proj_tol = np.minimum(u * A, HOEFFDING * u * N) + absolute + STORE * A + accum + 1e-300
    l1_tol = u * A + absolute + STORE * A + accum + 1e-300
    l2_tol = u * N + math.sqrt(width) * a + STORE * N + accum + 1e-300
    with np.errstate(invalid="ignore"):
        bad = (np.abs(cur[:, :PROJECTIONS] - ref[:, :PROJECTIONS]) > proj_tol[:, None]).any(1)
        bad |= np.abs(cur[:, PROJECTIONS] - A) > l1_tol
        bad |= np.abs(cur[:, PROJECTIONS + 1] - N) > l2_tol
    finite_ref, finite_cur = np.isfinite(ref).all(1), np.isfinite(cur).all(1)
    bad |= finite_ref != finite_cur
    both = ~finite_ref & ~finite_cur  # inf/nan on both sides: equal sketches (nan == nan) or changed
    if both.any():
        same = ((ref[both] == cur[both]) | (np.isnan(ref[both]) & np.isnan(cur[both]))).all(1)
        bad[np.flatnonzero(both)] = ~same
    return bad


def _narrowed_sha(src, entry: TensorEntry, dtype: str) -> str | None:
    """sha256 of the tensor cast back to `dtype` when every value is exactly one of `dtype`'s, else None."""
    digest = hashlib.sha256()
    rows, width = entry.rows, width_of(entry.shape)
    step = max(1, CHUNK // max(1, width))
    for r0 in range(0, rows, step):
        x = src.rows(entry, r0, min(rows, r0 + step)).reshape(-1)
        if dtype == "BF16":
            bits = x.astype(np.float32).view(np.uint32)
            if (bits & 0xFFFF).any() or not _same(x.astype(np.float32).astype(np.float64), x):
                return None
            digest.update((bits >> 16).astype("<u2").tobytes())
            continue
        narrow = x.astype({"F32": "<f4", "F16": "<f2"}[dtype])
        if not _same(narrow.astype(np.float64), x):
            return None
        digest.update(narrow.tobytes())
    return digest.hexdigest()


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(((a == b) | (np.isnan(a) & np.isnan(b))).all())


def check_tensors(src, records: TensorRecords, *, sign_key: bytes | None = None,
                  critical_rows: dict | None = None) -> TensorCheck:
    """Compare every loaded tensor of `src` with the records; never raises on tampering.
    `critical_rows`: tensor name -> rows that are fingerprinted slices (a changed one is a `critical_hits`)."""
    import time

    t0 = time.perf_counter()
    keyless = records.keyed and sign_key is None
    key = sketch_key(records.nonce, sign_key if records.keyed else None, keyed=records.keyed)
    if src.kind != records.format:
        f = TensorFinding(
            "*", ",".join(src.files), "format",
            f"the fingerprint records a {records.format} checkpoint but this is a {src.kind} file: the tensors of "
            "another encoding cannot be byte-identical (a different file is a different model to vouch for; "
            "use --quick for a slice-only cross-format check, or scan this file)",
        )
        return TensorCheck((f,), len(src.entries), len(records.records), 0, 0, 0, 0, time.perf_counter() - t0, 0)
    recorded = {r.name: r for r in records.records}
    present = {e.name for e in src.entries}
    findings: list[TensorFinding] = []
    comparable: list[tuple[TensorEntry, TensorRecord]] = []
    for e in src.entries:
        r = recorded.get(e.name)
        if r is None:
            findings.append(TensorFinding(e.name, e.file, "extra", "not in the fingerprint, but the loader loads it",
                                          rows_total=e.rows, actual_dtype=e.dtype, actual_shape=e.shape))
        elif tuple(e.shape) != tuple(r.shape):
            findings.append(TensorFinding(e.name, e.file, "reshaped", f"shape {list(e.shape)} != recorded "
                                          f"{list(r.shape)}", rows_total=e.rows, expected_dtype=r.dtype,
                                          actual_dtype=e.dtype, expected_shape=r.shape, actual_shape=e.shape))
        else:
            comparable.append((e, r))
    for r in records.records:
        if r.name not in present:
            findings.append(TensorFinding(r.name, r.file, "missing", "recorded, but no loaded file holds it",
                                          rows_total=r.rows, expected_dtype=r.dtype, expected_shape=r.shape))
    same = [(e, r) for e, r in comparable if e.dtype == r.dtype]
    digests = hash_entries(src, [e for e, _ in same])
    identical = equivalent = sketched = 0
    hashed = sum(e.nbytes for e, _ in same)
    for (e, r), digest in zip(same, digests):
        if digest == r.sha256:
            identical += 1
            continue
        sketched += 1
        findings.append(_localize(src, e, r, records, key, None, "bytes", "bytes differ from the recorded sha256",
                                  critical_rows))
    for e, r in comparable:
        if e.dtype == r.dtype:
            continue
        common = dict(rows_total=e.rows, expected_dtype=r.dtype, actual_dtype=e.dtype, expected_shape=r.shape,
                      actual_shape=e.shape)
        if src.kind == "gguf":
            findings.append(TensorFinding(e.name, e.file, "requantized", f"re-quantized {r.dtype} -> {e.dtype}: a "
                                          "re-quantized file is a different model; scan it to vouch for it", **common))
            continue
        if r.dtype not in FLOAT_DTYPES or e.dtype not in FLOAT_DTYPES or r.sketch_start < 0:
            findings.append(TensorFinding(e.name, e.file, "dtype", f"dtype {r.dtype} -> {e.dtype}: not a float "
                                          "re-cast guard can judge", **common))
            continue
        if e.dtype in _WIDER.get(r.dtype, ()):  # lossless widening: narrowed back, it must be the recorded bytes
            hashed += e.nbytes
            if _narrowed_sha(src, e, r.dtype) == r.sha256:
                equivalent += 1
                continue
            sketched += 1
            findings.append(_localize(src, e, r, records, key, None, "beyond-rounding",
                                      f"widened {r.dtype} -> {e.dtype}, but the values are not the recorded ones",
                                      critical_rows))
            continue
        sketched += 1
        f = _localize(src, e, r, records, key, e.dtype, "beyond-rounding",
                      f"re-cast {r.dtype} -> {e.dtype} with changes beyond the rounding to {e.dtype}", critical_rows)
        if f.rows_changed == 0:
            equivalent += 1
        else:
            findings.append(f)
    findings.sort(key=lambda f: (f.file, f.tensor))
    return TensorCheck(tuple(findings), len(src.entries), len(records.records), identical, equivalent, hashed,
                       sum(e.nbytes for e in src.entries), time.perf_counter() - t0, sketched, keyless)


def _localize(src, e: TensorEntry, r: TensorRecord, records: TensorRecords, key: tuple, rounding: str | None,
              kind: str, detail: str, critical_rows: dict | None = None) -> TensorFinding:
    """The finding for one changed tensor, with the rows whose sketch moved (rounding: the cast's target dtype)."""
    common = dict(rows_total=e.rows, expected_dtype=r.dtype, actual_dtype=e.dtype, expected_shape=r.shape,
                  actual_shape=e.shape)
    if r.sketch_start < 0:
        return TensorFinding(e.name, e.file, kind, detail + " (no sketch: rows not localized)", **common)
    ref = records.sketch[r.sketch_start : r.sketch_start + r.rows]
    cur = sketch_entry(src, e, key)
    if cur is None:
        return TensorFinding(e.name, e.file, kind, detail + " (rows not localized)", **common)
    # a signed fingerprint without its key: the public projections, the absolute sum and the norm are compared
    bad = _changed_rows(ref, cur, width_of(e.shape), rounding, keyed=key[1] is not None)
    rows = np.flatnonzero(bad)
    ranked = records.ranked.get(e.name, {})
    hits = tuple((row, ranked[row]) for row in rows.tolist() if row in ranked) if ranked else ()
    watched = (critical_rows or {}).get(e.name)
    crit = tuple(row for row in rows.tolist() if row in watched) if watched else ()
    if rounding is not None and not len(rows):
        return TensorFinding(e.name, e.file, kind, detail, rows_changed=0, **common)
    if not len(rows):
        detail += " (no row's sketch moved: a change below the sketch's resolution, rows not localized)"
        return TensorFinding(e.name, e.file, kind, detail, **common)
    return TensorFinding(e.name, e.file, kind, f"{detail}: {len(rows):,} of {e.rows:,} rows",
                         rows=tuple(int(x) for x in rows[:MAX_ROWS_LISTED]), rows_changed=int(len(rows)),
                         ranked_hits=hits, critical_hits=crit, **common)

