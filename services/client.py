"""`kvmesh generate --addr`: a streaming client of the public Gateway API."""

from __future__ import annotations

import sys

import grpc

from kvmesh.protos import gateway_pb2, gateway_pb2_grpc
from kvmesh.services.rpc import auth_metadata
from kvmesh.services.tls import PLAINTEXT, TlsFiles, sync_channel
from kvmesh.shared.engine.sequence import SamplingParams


def build_request(
    prompt: str, chat: bool, params: SamplingParams, model: str
) -> gateway_pb2.GenerateRequest:
    request = gateway_pb2.GenerateRequest(
        model=model, max_tokens=params.max_tokens, temperature=params.temperature,
        top_p=params.top_p, top_k=params.top_k, stop=list(params.stop),
        ignore_eos=params.ignore_eos,
    )  # fmt: skip
    if params.seed is not None:
        request.seed = params.seed
    if chat:
        request.messages.add(role="user", content=prompt)
    else:
        request.prompt = prompt
    return request


def generate_remote(
    address: str, prompt: str, chat: bool, params: SamplingParams, model: str,
    tls: TlsFiles = PLAINTEXT, api_key: str = "",
) -> int:  # fmt: skip
    with sync_channel(address, tls) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        request = build_request(prompt, chat, params, model)
        try:
            for response in stub.Generate(request, metadata=auth_metadata(api_key)):
                sys.stdout.write(response.text)
                sys.stdout.flush()
                if response.finish_reason:
                    usage = response.usage
                    print(
                        f"\n[finish={response.finish_reason}, prompt {usage.prompt_tokens} "
                        f"tokens, completion {usage.completion_tokens} tokens]",
                        file=sys.stderr,
                    )
        except grpc.RpcError as e:
            print(f"\nkvmesh: {e.code().name}: {e.details()}", file=sys.stderr)  # type: ignore[attr-defined]
            return 1
    return 0
