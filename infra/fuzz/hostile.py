"""Writes hand-made hostile headers into fuzz/regressions/: GGUF and safetensors files that
declare huge counts, lengths and sizes in a few bytes. The replay (`cargo test -p llm-fuzz`)
feeds them to the targets: each must be refused with an error before anything of the declared
size is allocated (an allocation of that size would abort the test process)."""
import json
import struct
from pathlib import Path

OUT = Path(__file__).resolve().parents[2] / "fuzz" / "regressions"
HUGE = 1 << 60


def write(target, name, data):
    path = OUT / target / f"hostile-{name}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def gguf(tensors, kvs, body=b""):
    return b"GGUF" + struct.pack("<IQQ", 3, tensors, kvs) + body


def string(text, length=None):
    raw = text.encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw


GGUF_STRING, GGUF_ARRAY, GGUF_UINT32 = 8, 9, 4
write("gguf", "tensor-count", gguf(HUGE, 0))
write("gguf", "kv-count", gguf(0, HUGE))
write("gguf", "key-length", gguf(0, 1, string("k", HUGE)))
write("gguf", "string-length", gguf(0, 1, string("general.name") + struct.pack("<I", GGUF_STRING) + string("x", HUGE)))
write("gguf", "array-length", gguf(0, 1, string("tokenizer.ggml.tokens") + struct.pack("<IIQ", GGUF_ARRAY, GGUF_STRING, HUGE)))
write("gguf", "nested-arrays", gguf(0, 1, string("a") + struct.pack("<I", GGUF_ARRAY) + struct.pack("<IQ", GGUF_ARRAY, 1) * 64))
# One tensor of 2^40 x 2^40 f32 elements whose data "starts" at offset 0.
write("gguf", "tensor-dims", gguf(1, 0, string("token_embd.weight") + struct.pack("<IQQIQ", 2, 1 << 40, 1 << 40, 0, 0)))
write("gguf", "tensor-rank", gguf(1, 0, string("token_embd.weight") + struct.pack("<I", 1 << 30)))

def safetensors(header, data=b""):
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data

write("safetensors", "header-length", struct.pack("<Q", HUGE) + b"{}")
write("safetensors", "shape", safetensors({"model.embed_tokens.weight": {"dtype": "F32", "shape": [1 << 40, 1 << 40], "data_offsets": [0, 16]}}, b"\0" * 16))
write("safetensors", "offsets", safetensors({"model.embed_tokens.weight": {"dtype": "F32", "shape": [261, 32], "data_offsets": [0, HUGE]}}, b"\0" * 16))
write("safetensors", "overflow", safetensors({"model.embed_tokens.weight": {"dtype": "F32", "shape": [1 << 62, 8], "data_offsets": [0, 0]}}))
