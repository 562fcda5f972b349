"""The API as the official `openai` Python client calls it (pip install openai).

Run by functions/llm/tests/serve.rs against `llm serve`; exits non-zero with the failed check.
    python3 tests/clients/openai_check.py --base-url http://127.0.0.1:PORT/v1 --model ID --api-key KEY --eos-id ID
"""
import argparse

import openai


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--api-key", required=True)
    ap.add_argument("--eos-id", type=int, required=True, help="the model's end-of-generation token id")
    args = ap.parse_args()
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0, timeout=120)
    model = args.model

    assert [m.id for m in client.models.list().data] == [model]

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}]
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)
    choice = chat.choices[0]
    assert chat.object == "chat.completion" and choice.message.role == "assistant", chat
    assert choice.finish_reason in ("stop", "length"), choice
    assert chat.usage.completion_tokens <= 12 and chat.usage.prompt_tokens > 0
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens

    # Streamed text equals the non-streamed text at temperature 0, and so do the counts.
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    text, finish, usage = "", None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert text == choice.message.content, (text, choice.message.content)
    assert finish == choice.finish_reason and usage == chat.usage, (finish, usage, chat.usage)

    # Log-probabilities: one entry per generated token, whose texts spell the content; greedy
    # tokens are the most likely alternative; streamed entries equal the answer's.
    scored = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0,
                                            logprobs=True, top_logprobs=3)
    content = scored.choices[0].logprobs.content
    spelled = b"".join(bytes(t.bytes) for t in content).decode()
    assert spelled == scored.choices[0].message.content, content
    assert len(content) == scored.usage.completion_tokens - (scored.choices[0].finish_reason == "stop")
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0, t
        assert t.token == bytes(t.bytes).decode(errors="replace") or t.token.startswith("bytes:"), t
        assert t.top_logprobs[0].logprob == t.logprob and t.top_logprobs[0].token == t.token, t
    streamed_lp = []
    for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0,
                                                logprobs=True, top_logprobs=3, stream=True):
        for c in chunk.choices:
            streamed_lp += c.logprobs.content if c.logprobs else []
    assert [(t.token, t.logprob) for t in streamed_lp] == [(t.token, t.logprob) for t in content]
    legacy = client.completions.create(model=model, prompt="The quick brown fox", max_tokens=6, temperature=0, logprobs=2)
    lp = legacy.choices[0].logprobs
    if not any(t.startswith("bytes:") for t in lp.tokens):
        assert "".join(lp.tokens) == legacy.choices[0].text, lp
        assert lp.text_offset == [sum(len(t.encode()) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert len(lp.token_logprobs) == len(lp.tokens) == len(lp.top_logprobs) == len(lp.text_offset)
    assert all(len(top) <= 2 and max(top.values()) >= v for top, v in zip(lp.top_logprobs, lp.token_logprobs))

    # echo: the prompt comes back before the completion; with max_tokens=0 and logprobs (how
    # lm-evaluation-harness scores text) every prompt token after the first gets a logprob.
    prompt = "The quick brown fox"
    scored = client.completions.create(model=model, prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    lp = scored.choices[0].logprobs
    assert scored.choices[0].text == prompt and scored.usage.completion_tokens == 0, scored
    assert len(lp.tokens) == scored.usage.prompt_tokens and lp.token_logprobs[0] is None, lp
    assert all(v <= 0 for v in lp.token_logprobs[1:]) and lp.top_logprobs[0] is None, lp
    plain = client.completions.create(model=model, prompt=prompt, max_tokens=4, temperature=0)
    echoed = client.completions.create(model=model, prompt=prompt, max_tokens=4, temperature=0, echo=True)
    assert echoed.choices[0].text == prompt + plain.choices[0].text, (echoed.choices[0].text, plain.choices[0].text)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=model, prompt=prompt, max_tokens=4, temperature=0, echo=True, stream=True) if c.choices)
    assert streamed == echoed.choices[0].text, (streamed, echoed.choices[0].text)

    # A list of prompts with n=2 is one batch: choices indexed prompt * n + choice.
    prompts = ["The quick brown fox", "Once upon a time"]
    done = client.completions.create(model=model, prompt=prompts, max_tokens=5, n=2, temperature=0)
    assert [c.index for c in done.choices] == [0, 1, 2, 3], done
    assert done.choices[0].text == done.choices[1].text, "greedy choices of one prompt differ"
    for i, prompt in enumerate(prompts):
        alone = client.completions.create(model=model, prompt=prompt, max_tokens=5, temperature=0)
        assert alone.choices[0].text == done.choices[2 * i].text, (prompt, alone.choices[0].text, done.choices[2 * i].text)
    assert done.usage.completion_tokens == 20 or done.usage.completion_tokens < 20
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=model, prompt=prompts[0], max_tokens=5, temperature=0, stream=True) if c.choices)
    assert streamed == done.choices[0].text, (streamed, done.choices[0].text)

    # logit_bias as OpenAI takes it (token ids as strings, biases in [-100, 100]): +100 makes a
    # sampled completion one token over and over; ignore_eos (vLLM's extension) is taken too.
    forced = client.completions.create(model=model, prompt=prompts[0], max_tokens=3, temperature=1, seed=1, logprobs=0,
                                       logit_bias={"1000": 100}, extra_body={"ignore_eos": True})
    tokens = forced.choices[0].logprobs.tokens
    token_1000 = client.completions.create(model=model, prompt=[1000], max_tokens=0, echo=True).choices[0].text
    assert tokens == [token_1000] * 3, (tokens, token_1000)
    free = client.completions.create(model=model, prompt=prompts[0], max_tokens=3, temperature=1, seed=1, logprobs=0)
    assert free.choices[0].logprobs.tokens != tokens, free
    # The end-of-generation token, forced: it stops the completion, unless ignore_eos.
    eos = {str(args.eos_id): 100}
    stopped = client.completions.create(model=model, prompt=prompts[0], max_tokens=3, temperature=0, logit_bias=eos)
    assert stopped.choices[0].finish_reason == "stop" and stopped.usage.completion_tokens == 1, stopped
    kept = client.completions.create(model=model, prompt=prompts[0], max_tokens=3, temperature=0, logit_bias=eos, logprobs=0,
                                     extra_body={"ignore_eos": True})
    assert kept.choices[0].finish_reason == "length" and kept.usage.completion_tokens == 3, kept
    assert len(kept.choices[0].logprobs.tokens) == 3, kept

    def expect(error, **kwargs):
        call = kwargs.pop("call", client.chat.completions.create)
        try:
            call(**kwargs)
        except error as e:
            body = e.body if isinstance(e.body, dict) else {}
            assert "message" in body, e
            return e
        raise AssertionError(f"expected {error.__name__} for {str(kwargs)[:200]}")

    expect(openai.BadRequestError, model=model, messages=messages, max_tokens=-1)
    expect(openai.BadRequestError, model=model, messages=messages, temperature=2.5)
    expect(openai.BadRequestError, model=model, messages=[])
    expect(openai.BadRequestError, model=model, messages=messages, logprobs=True, top_logprobs=21)
    for bias in ({"one": 1}, {"5": 101}, {"999999999": 1}):
        expect(openai.BadRequestError, model=model, messages=messages, logit_bias=bias)
    long = expect(openai.BadRequestError, model=model, prompt="x " * 5000, call=client.completions.create)
    assert "tokens" in long.body["message"], long.body
    expect(openai.NotFoundError, model="no-such-model", messages=messages)
    too_big = expect(openai.APIStatusError, model=model, prompt="x" * (2 << 20), call=client.completions.create)
    assert too_big.status_code == 413, too_big.status_code
    wrong = openai.OpenAI(base_url=args.base_url, api_key="wrong", max_retries=0)
    expect(openai.AuthenticationError, model=model, messages=messages, call=wrong.chat.completions.create)
    print("openai client checks passed")


if __name__ == "__main__":
    main()
