#!/usr/bin/env python3
"""gguf_write.py - a small GGUF v3 writer (and reader, for checks), standard library only.

Written from the GGUF specification (ggml docs/gguf.md): little-endian; header = magic "GGUF",
version u32 3, tensor_count u64, metadata_kv_count u64; each key/value = string key, value type
u32, value; a string = u64 length + UTF-8 bytes; an array = element type u32, count u64, elements;
then one info per tensor (name, n_dims u32, ne[] u64 with ne0 the innermost dimension, ggml type
u32, offset u64 relative to the data section); padding to the alignment; the data section, each
tensor at a multiple of the alignment (general.alignment, default 32).

    w = GGUFWriter()
    w.add_str("general.architecture", "llama")
    w.add_u32("llama.block_count", 2)
    w.add_array("tokenizer.ggml.tokens", STRING, ["<unk>", "<s>"])
    w.add_tensor("token_embd.weight", [64, 512], GGML_F16, raw_bytes)   # ne order: ne0 first
    w.write("model.gguf")

read_gguf(path) returns (kv dict, tensor list) for checking what was written.
"""
import struct

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3
DEFAULT_ALIGNMENT = 32

# metadata value types (gguf_metadata_value_type)
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)

# the ggml tensor types this writer stores (ggml_type)
GGML_F32 = 0
GGML_F16 = 1
TYPE_NAMES = {GGML_F32: "F32", GGML_F16: "F16"}
_TYPE_SIZE = {GGML_F32: 4, GGML_F16: 2}

# struct format of each scalar value type
_SCALAR_FMT = {UINT8: "<B", INT8: "<b", UINT16: "<H", INT16: "<h", UINT32: "<I", INT32: "<i",
               FLOAT32: "<f", BOOL: "<?", UINT64: "<Q", INT64: "<q", FLOAT64: "<d"}
_INT_RANGE = {UINT8: (0, 2**8 - 1), INT8: (-2**7, 2**7 - 1), UINT16: (0, 2**16 - 1),
              INT16: (-2**15, 2**15 - 1), UINT32: (0, 2**32 - 1), INT32: (-2**31, 2**31 - 1),
              UINT64: (0, 2**64 - 1), INT64: (-2**63, 2**63 - 1)}


class GGUFError(Exception):
    pass


def _pack_str(s):
    b = s.encode("utf-8") if isinstance(s, str) else bytes(s)
    return struct.pack("<Q", len(b)) + b


def _pack_scalar(vtype, v, key):
    if vtype == STRING:
        if not isinstance(v, (str, bytes, bytearray)):
            raise GGUFError(f"{key}: string value expected, got {type(v).__name__}")
        return _pack_str(v)
    if vtype == BOOL:
        if not isinstance(v, bool):
            raise GGUFError(f"{key}: bool value expected, got {v!r}")
        return struct.pack("<?", v)
    if vtype in _INT_RANGE:
        if isinstance(v, bool) or not isinstance(v, int):
            raise GGUFError(f"{key}: integer value expected, got {v!r}")
        lo, hi = _INT_RANGE[vtype]
        if not lo <= v <= hi:
            raise GGUFError(f"{key}: {v} out of range for value type {vtype}")
        return struct.pack(_SCALAR_FMT[vtype], v)
    if vtype in (FLOAT32, FLOAT64):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise GGUFError(f"{key}: float value expected, got {v!r}")
        return struct.pack(_SCALAR_FMT[vtype], float(v))
    raise GGUFError(f"{key}: unknown value type {vtype}")


class GGUFWriter:
    """Collects metadata and tensors in insertion order, then writes one GGUF v3 file."""

    def __init__(self, alignment=DEFAULT_ALIGNMENT):
        if alignment <= 0 or alignment % 8:
            raise GGUFError(f"alignment {alignment} is not a positive multiple of 8")
        self.alignment = alignment
        self._kv = {}          # key -> packed (type + value) bytes
        self._kv_values = {}   # key -> python value, for callers that want to look back
        self._tensors = []     # (name, ne list, ggml type, bytes)
        self._names = set()
        if alignment != DEFAULT_ALIGNMENT:
            self.add_u32("general.alignment", alignment)

    # ---- metadata ----
    def _add(self, key, vtype, payload, value):
        if not isinstance(key, str) or not key or len(key.encode()) > 65535 or not key.isascii():
            raise GGUFError(f"bad metadata key {key!r}")
        if key in self._kv:
            raise GGUFError(f"duplicate metadata key {key}")
        self._kv[key] = struct.pack("<I", vtype) + payload
        self._kv_values[key] = value

    def add(self, key, vtype, value):
        self._add(key, vtype, _pack_scalar(vtype, value, key), value)

    def add_u8(self, k, v): self.add(k, UINT8, v)
    def add_i8(self, k, v): self.add(k, INT8, v)
    def add_u16(self, k, v): self.add(k, UINT16, v)
    def add_i16(self, k, v): self.add(k, INT16, v)
    def add_u32(self, k, v): self.add(k, UINT32, v)
    def add_i32(self, k, v): self.add(k, INT32, v)
    def add_u64(self, k, v): self.add(k, UINT64, v)
    def add_i64(self, k, v): self.add(k, INT64, v)
    def add_f32(self, k, v): self.add(k, FLOAT32, v)
    def add_f64(self, k, v): self.add(k, FLOAT64, v)
    def add_bool(self, k, v): self.add(k, BOOL, v)
    def add_str(self, k, v): self.add(k, STRING, v)

    def add_array(self, key, elem_type, values):
        """An array of scalars or strings (elem_type: one of the value types, not ARRAY)."""
        if elem_type == ARRAY:
            raise GGUFError(f"{key}: nested arrays are not supported by this writer")
        values = list(values)
        if elem_type in (UINT8, INT8, UINT16, INT16, UINT32, INT32, UINT64, INT64, FLOAT32, FLOAT64, BOOL):
            for v in values:  # range/type checks
                _pack_scalar(elem_type, v, key)
            fmt = "<%d%s" % (len(values), _SCALAR_FMT[elem_type][1])
            body = struct.pack(fmt, *[float(v) if elem_type in (FLOAT32, FLOAT64) else v for v in values])
        else:
            body = b"".join(_pack_scalar(elem_type, v, key) for v in values)
        self._add(key, ARRAY, struct.pack("<IQ", elem_type, len(values)) + body, values)

    def value(self, key):
        return self._kv_values[key]

    def keys(self):
        return list(self._kv)

    # ---- tensors ----
    def add_tensor(self, name, ne, ggml_type, data):
        """ne: dimensions innermost first (GGUF order: ne0 = row length); data: raw bytes."""
        if name in self._names:
            raise GGUFError(f"duplicate tensor {name}")
        if len(name.encode()) > 64:
            raise GGUFError(f"tensor name {name!r} is longer than 64 bytes")
        if ggml_type not in _TYPE_SIZE:
            raise GGUFError(f"{name}: tensor type {ggml_type} is not supported (F32, F16)")
        ne = [int(x) for x in ne]
        if not 1 <= len(ne) <= 4 or any(x <= 0 for x in ne):
            raise GGUFError(f"{name}: bad dimensions {ne}")
        n = 1
        for x in ne:
            n *= x
        if len(data) != n * _TYPE_SIZE[ggml_type]:
            raise GGUFError(f"{name}: {len(data)} bytes of data for {ne} {TYPE_NAMES[ggml_type]} "
                            f"(expected {n * _TYPE_SIZE[ggml_type]})")
        self._names.add(name)
        self._tensors.append((name, ne, ggml_type, bytes(data)))

    def tensor_names(self):
        return [t[0] for t in self._tensors]

    # ---- output ----
    def _pad(self, n):
        return (self.alignment - n % self.alignment) % self.alignment

    def to_bytes(self):
        out = [GGUF_MAGIC, struct.pack("<IQQ", GGUF_VERSION, len(self._tensors), len(self._kv))]
        for k, v in self._kv.items():
            out += [_pack_str(k), v]
        offset = 0
        for name, ne, t, data in self._tensors:
            out += [_pack_str(name), struct.pack("<I", len(ne)), struct.pack("<%dQ" % len(ne), *ne),
                    struct.pack("<IQ", t, offset)]
            offset += len(data) + self._pad(len(data))
        head = b"".join(out)
        parts = [head, b"\0" * self._pad(len(head))]
        for _, _, _, data in self._tensors:
            parts += [data, b"\0" * self._pad(len(data))]
        return b"".join(parts)

    def write(self, path):
        blob = self.to_bytes()
        with open(path, "wb") as f:
            f.write(blob)
        return len(blob)


# ---- reader (for checks) ----
def read_gguf(path):
    """Returns (kv, tensors): kv maps key -> (value type, value; arrays as (elem type, list)),
    tensors is a list of dicts {name, ne, type, offset (absolute), nbytes}. Raises GGUFError on
    anything malformed."""
    with open(path, "rb") as f:
        buf = f.read()
    pos = 0

    def take(n):
        nonlocal pos
        if pos + n > len(buf):
            raise GGUFError(f"{path}: truncated at byte {pos}")
        b = buf[pos:pos + n]
        pos += n
        return b

    def rd(fmt):
        return struct.unpack(fmt, take(struct.calcsize(fmt)))[0]

    def rstr():
        return take(rd("<Q")).decode("utf-8")

    def rval(t):
        if t == STRING:
            return rstr()
        if t == ARRAY:
            et, n = rd("<I"), rd("<Q")
            return (et, [rval(et) for _ in range(n)])
        if t not in _SCALAR_FMT:
            raise GGUFError(f"{path}: unknown value type {t}")
        return rd(_SCALAR_FMT[t])

    if take(4) != GGUF_MAGIC:
        raise GGUFError(f"{path}: not a GGUF file")
    version, n_t, n_kv = rd("<I"), rd("<Q"), rd("<Q")
    if version != GGUF_VERSION:
        raise GGUFError(f"{path}: GGUF version {version}, expected 3")
    kv = {}
    for _ in range(n_kv):
        k = rstr()
        t = rd("<I")
        kv[k] = (t, rval(t))
    align = kv.get("general.alignment", (UINT32, DEFAULT_ALIGNMENT))[1]
    tensors = []
    for _ in range(n_t):
        name = rstr()
        nd = rd("<I")
        ne = [rd("<Q") for _ in range(nd)]
        t, off = rd("<I"), rd("<Q")
        if t not in _TYPE_SIZE:
            raise GGUFError(f"{path}: {name}: tensor type {t} not readable here")
        n = 1
        for x in ne:
            n *= x
        tensors.append({"name": name, "ne": ne, "type": t, "offset": off, "nbytes": n * _TYPE_SIZE[t]})
    data0 = pos + (align - pos % align) % align
    for ti in tensors:
        if ti["offset"] % align:
            raise GGUFError(f"{path}: {ti['name']} offset {ti['offset']} is not aligned")
        ti["offset"] += data0
        if ti["offset"] + ti["nbytes"] > len(buf):
            raise GGUFError(f"{path}: {ti['name']} runs past the end of the file")
    return kv, tensors


def tensor_values(path, ti):
    """The float values of one tensor from read_gguf (F32 or F16), as a list."""
    with open(path, "rb") as f:
        f.seek(ti["offset"])
        b = f.read(ti["nbytes"])
    code = "f" if ti["type"] == GGML_F32 else "e"
    return list(struct.unpack("<%d%s" % (len(b) // _TYPE_SIZE[ti["type"]], code), b))
