"""Writes the seed inputs of every fuzz target into fuzz/corpus/TARGET/seed-* (standard library
only): a tiny checkpoint matching fuzz/tiny/config.json in F32/F16/BF16 safetensors, the test
fixtures' config.json files and chat templates, the demo tokenizer, and typical API bodies, S3
events and batch lines. The GGUF seeds are that checkpoint converted by `llm quantize`
(infra/fuzz/seeds.sh). Deterministic: the same files every run."""
import json
import random
import struct
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "fuzz" / "corpus"
FIXTURES = ROOT / "tests" / "fixtures"


def seed(target, name, data):
    path = CORPUS / target / f"seed-{name}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())


def tensor_bytes(count, dtype, rng):
    values = [rng.gauss(0.0, 0.02) for _ in range(count)]
    if dtype == "F32":
        return struct.pack(f"<{count}f", *values)
    half = struct.pack(f"<{count}e", *values)
    if dtype == "F16":
        return half
    # BF16: the high half of each f32.
    return b"".join(struct.pack("<f", v)[2:] for v in values)


def safetensors(config, dtype, rng):
    h, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q, kv = config["num_attention_heads"] * config["head_dim"], config["num_key_value_heads"] * config["head_dim"]
    shapes = {"model.embed_tokens.weight": [v, h], "model.norm.weight": [h]}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes.update({f"{p}.input_layernorm.weight": [h], f"{p}.post_attention_layernorm.weight": [h],
                       f"{p}.self_attn.q_proj.weight": [q, h], f"{p}.self_attn.k_proj.weight": [kv, h],
                       f"{p}.self_attn.v_proj.weight": [kv, h], f"{p}.self_attn.o_proj.weight": [h, q],
                       f"{p}.mlp.gate_proj.weight": [f, h], f"{p}.mlp.up_proj.weight": [f, h],
                       f"{p}.mlp.down_proj.weight": [h, f]})
    header, data = {"__metadata__": {"format": "pt"}}, b""
    for name, shape in sorted(shapes.items()):
        count = 1
        for d in shape:
            count *= d
        blob = tensor_bytes(count, dtype, rng)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(blob)]}
        data += blob
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def main(checkpoint_dir):
    rng = random.Random(0)
    config = json.loads((ROOT / "fuzz" / "tiny" / "config.json").read_text())
    checkpoint = Path(checkpoint_dir)
    checkpoint.mkdir(parents=True, exist_ok=True)
    for dtype in ("F32", "F16", "BF16"):
        weights = safetensors(config, dtype, rng)
        seed("safetensors", dtype.lower(), weights)
        if dtype == "F16":
            (checkpoint / "model.safetensors").write_bytes(weights)
    for name in ("config.json", "tokenizer.json"):
        (checkpoint / name).write_bytes((ROOT / "fuzz" / "tiny" / name).read_bytes())

    seed("config_json", "tiny", (ROOT / "fuzz" / "tiny" / "config.json").read_text())
    for fixture in ("llama2", "llama3"):
        seed("config_json", fixture, (FIXTURES / fixture / "hf" / "config.json").read_text())
        template = json.loads((FIXTURES / fixture / "hf" / "tokenizer_config.json").read_text())["chat_template"]
        seed("chat_template", fixture, template)
    seed("config_json", "index", json.dumps({"metadata": {"total_size": 64}, "weight_map": {
        "model.embed_tokens.weight": "model-00001-of-00002.safetensors", "lm_head.weight": "model-00002-of-00002.safetensors"}}))
    seed("config_json", "rope-scaling", json.dumps({**config, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
         "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}))

    seed("tokenizer_json", "demo", (ROOT / "fuzz" / "tiny" / "tokenizer.json").read_text())
    seed("chat_template", "demo", "{{ bos_token }}{% for message in messages %}{{ '<|' + message['role'] + '|>' + "
         "message['content'] + '<|end|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
    seed("chat_template", "loop", "{% for i in range(10) %}{% for m in messages %}{{ m.content | upper }}{% endfor %}{% endfor %}")

    # The http_request target's first byte picks the endpoint: 0 chat, 1 completions, 2 models.
    chat = {"model": "demo", "messages": [{"role": "user", "content": "What is 2 + 3?"}], "max_tokens": 3,
            "temperature": 0.7, "top_p": 0.9, "seed": 1, "logprobs": True, "top_logprobs": 2, "stop": ["\n"]}
    completion = {"model": "demo", "prompt": ["Hello", "Hi"], "max_tokens": 2, "n": 2, "echo": True, "logprobs": 1}
    seed("http_request", "chat", b"\x00" + json.dumps(chat).encode())
    seed("http_request", "chat-parts", b"\x00" + json.dumps({"model": "demo", "messages": [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
         {"role": "user", "content": "Hi"}], "max_completion_tokens": 2, "stream": True, "stream_options": {"include_usage": True}}).encode())
    seed("http_request", "completion", b"\x01" + json.dumps(completion).encode())
    seed("http_request", "tokens", b"\x01" + json.dumps({"model": "demo", "prompt": [[1, 2, 3], [4]], "max_tokens": 1, "stop": "x"}).encode())
    seed("http_request", "models", b"\x02")

    record = {"eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": "us-east-1", "eventTime": "2026-11-30T12:00:00.000Z",
              "eventName": "ObjectCreated:Put", "userIdentity": {"principalId": "AWS:EXAMPLE"},
              "requestParameters": {"sourceIPAddress": "127.0.0.1"}, "responseElements": {"x-amz-request-id": "1", "x-amz-id-2": "2"},
              "s3": {"s3SchemaVersion": "1.0", "configurationId": "quantize", "bucket": {"name": "models", "ownerIdentity": {"principalId": "A"},
                     "arn": "arn:aws:s3:::models"}, "object": {"key": "incoming/my+model/config.json", "size": 716,
                     "eTag": "0123456789abcdef", "sequencer": "0A1B2C3D4E5F678901"}}}
    seed("s3_event", "put", json.dumps({"Records": [record]}))
    escaped = json.loads(json.dumps(record))
    escaped["s3"]["object"]["key"] = "batches/input/caf%C3%A9%20n%2B1.jsonl"
    seed("s3_event", "escaped", json.dumps({"Records": [record, escaped]}))

    line = lambda i, url, body: json.dumps({"custom_id": f"r{i}", "method": "POST", "url": url, "body": body})
    seed("batch_file", "mixed", "\n".join([
        line(1, "/v1/chat/completions", {"model": "demo", "messages": [{"role": "user", "content": "Write abc in capitals."}], "max_tokens": 3}),
        line(2, "/v1/completions", {"model": "demo", "prompt": "Hello", "max_tokens": 2, "n": 2}),
        line(3, "/v1/completions", {"prompt": "x", "stream": True}),
        line(1, "/v1/completions", {"prompt": "duplicate"}),
        "not json",
    ]) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
