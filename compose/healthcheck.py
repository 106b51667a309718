#!/usr/bin/env python3
"""Container health check: grpc.health.v1 Check of the overall ("") service of this process.

    kvmesh-healthcheck [HOST:PORT]      default 127.0.0.1:$KVMESH_PORT (50051 if unset)

Exit 0 when SERVING; 1 when NOT_SERVING (draining after SIGTERM), unreachable or too slow.
Installed into the image as /usr/local/bin/kvmesh-healthcheck (compose/Dockerfile).
"""

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

TIMEOUT_S = 3.0


def main(argv: list[str]) -> int:
    address = argv[1] if len(argv) > 1 else f"127.0.0.1:{os.environ.get('KVMESH_PORT', '50051')}"
    request = health_pb2.HealthCheckRequest(service="")
    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(request, timeout=TIMEOUT_S)
    except grpc.RpcError as e:
        print(f"{address}: {e.code().name}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{address}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
