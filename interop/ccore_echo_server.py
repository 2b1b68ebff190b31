"""A C-core (grpcio) echo server with grpc.health.v1, for interop checks.

It serves proto/echo.proto and the health service (SERVING) on 127.0.0.1:PORT,
with SETTINGS_MAX_CONCURRENT_STREAMS set to LIMIT, and prints READY once it
listens. Not part of `cargo test`: it needs Python and grpcio.

    python3 -m venv /tmp/grpcenv
    /tmp/grpcenv/bin/pip install grpcio grpcio-health-checking grpcio-tools
    /tmp/grpcenv/bin/python interop/ccore_echo_server.py PORT [LIMIT]

It compiles proto/echo.proto into a temporary directory at start.
"""

import os
import sys
import tempfile
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_tools import protoc

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_DIR = os.path.join(HERE, "..", "proto")


def compile_echo():
    out = tempfile.mkdtemp(prefix="healthlb-echo-")
    code = protoc.main(
        ["protoc", f"-I{PROTO_DIR}", f"--python_out={out}", f"--grpc_python_out={out}", "echo.proto"]
    )
    if code != 0:
        sys.exit(f"protoc failed with {code}")
    sys.path.insert(0, out)


def main():
    if len(sys.argv) < 2:
        sys.exit("usage: ccore_echo_server.py PORT [LIMIT]")
    port = int(sys.argv[1])
    limit = int(sys.argv[2]) if len(sys.argv) > 2 else 100
    compile_echo()
    import echo_pb2
    import echo_pb2_grpc

    class Echo(echo_pb2_grpc.EchoServicer):
        def Unary(self, request, context):
            return echo_pb2.EchoReply(message=request.message, backend="ccore", seq=0)

        def ServerStream(self, request, context):
            for seq in range(request.count):
                if seq > 0:
                    time.sleep(request.interval_ms / 1000)
                yield echo_pb2.EchoReply(message=request.message, backend="ccore", seq=seq)

        def Bidi(self, requests, context):
            for seq, request in enumerate(requests):
                yield echo_pb2.EchoReply(message=request.message, backend="ccore", seq=seq)

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=64),
        options=[("grpc.max_concurrent_streams", limit)],
    )
    echo_pb2_grpc.add_EchoServicer_to_server(Echo(), server)
    checker = health.HealthServicer()
    checker.set("", health_pb2.HealthCheckResponse.SERVING)
    checker.set("echo.Echo", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print(f"READY grpcio {grpc.__version__}, max_concurrent_streams {limit}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
