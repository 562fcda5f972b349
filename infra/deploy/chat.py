"""Chat with the deployed inference function through the official openai client.

    python3 infra/deploy/chat.py FUNCTION_URL "Write llama in capitals." [--stream] [--no-sigv4]

FUNCTION_URL is the stack's ApiUrl output. With the template's default ApiAuth=AWS_IAM the
function URL accepts only SigV4-signed requests (service `lambda`): each request is signed here
with the caller's AWS credentials (boto3's usual chain; the caller needs
lambda:InvokeFunctionUrl on the function). With ApiAuth=NONE pass --no-sigv4.
"""
import argparse

import openai

try:  # the openai client's HTTP library: httpx2 from openai 3 on, httpx before
    import httpx2 as httpx
except ImportError:
    import httpx


class SigV4(httpx.Auth):
    """Signs each request as AWS expects for a Lambda function URL with AuthType AWS_IAM."""

    requires_request_body = True

    def __init__(self, region):
        import boto3
        from botocore.auth import SigV4Auth

        session = boto3.Session(region_name=region)
        self.signer = SigV4Auth(session.get_credentials(), "lambda", region or session.region_name)

    def auth_flow(self, request):
        from botocore.awsrequest import AWSRequest

        # Sign only what no proxy rewrites; the openai client's bearer token is replaced.
        signed = AWSRequest(
            method=request.method,
            url=str(request.url),
            data=request.content,
            headers={"content-type": request.headers.get("content-type", "application/json")},
        )
        self.signer.add_auth(signed)
        for name, value in signed.headers.items():
            request.headers[name] = value
        yield request


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url")
    parser.add_argument("prompt")
    parser.add_argument("--model", help="default: the one model the function serves (GET /v1/models)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, help="default: the server's (1.0)")
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--no-sigv4", action="store_true")
    parser.add_argument("--region", default=None)
    args = parser.parse_args()

    auth = None if args.no_sigv4 else SigV4(args.region)
    client = openai.OpenAI(
        base_url=args.url.rstrip("/") + "/v1", api_key="unused-with-sigv4", http_client=httpx.Client(auth=auth, timeout=900)
    )
    model = args.model or client.models.list().data[0].id
    messages = [{"role": "user", "content": args.prompt}]
    options = dict(model=model, messages=messages, max_tokens=args.max_tokens)
    if args.temperature is not None:
        options["temperature"] = args.temperature
    if args.stream:
        for chunk in client.chat.completions.create(**options, stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                print(chunk.choices[0].delta.content, end="", flush=True)
        print()
    else:
        reply = client.chat.completions.create(**options)
        print(reply.choices[0].message.content)


if __name__ == "__main__":
    main()
