"""A real gRPC server and client (grpcio) for interop tests through the proxy.

No generated code: the methods use raw bytes, so no protoc is needed.

    python grpc_echo.py server            # prints "PORT <n>" once serving on 127.0.0.1
    python grpc_echo.py client HOST:PORT AUTHORITY
                                          # runs the calls, prints one JSON object, exits 0
    python grpc_echo.py client xds:///SERVICE -
                                          # the same through xDS (GRPC_XDS_BOOTSTRAP set)
"""

import json
import queue
import sys
from concurrent import futures

import grpc


def unary(request, context):
    context.set_trailing_metadata((("x-trailer", "kept"),))
    return b"echo:" + request


def bidi(request_iterator, context):
    context.set_trailing_metadata((("x-trailer", "kept"),))
    for message in request_iterator:
        yield b"echo:" + message


def fail(request, context):
    context.set_trailing_metadata((("x-trailer", "kept"),))
    context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")


def serve():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
        "Fail": grpc.unary_unary_rpc_method_handler(fail),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"PORT {port}", flush=True)
    # Serve until the parent closes our stdin.
    sys.stdin.read()
    server.stop(0)


def client(target, authority):
    options = () if authority == "-" else (("grpc.default_authority", authority),)
    out = {}
    with grpc.insecure_channel(target, options=options) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        call = channel.unary_unary("/test.Echo/Unary")
        reply, info = call.with_call(b"hello", timeout=10)
        out["unary"] = {
            "reply": reply.decode(),
            "code": info.code().name,
            "trailers": dict(info.trailing_metadata()),
        }

        # Bidirectional: each reply must arrive before the next request is sent, which
        # only works if the proxy streams both ways instead of buffering.
        outbox = queue.Queue()
        replies = channel.stream_stream("/test.Echo/Bidi")(iter(outbox.get, None), timeout=10)
        sent, got = [], []
        for word in ("one", "two", "three"):
            outbox.put(word.encode())
            sent.append(word)
            got.append(next(replies).decode())
        outbox.put(None)
        got.extend(m.decode() for m in replies)
        out["bidi"] = {
            "sent": sent,
            "got": got,
            "code": replies.code().name,
            "trailers": dict(replies.trailing_metadata()),
        }

        try:
            channel.unary_unary("/test.Echo/Fail")(b"x", timeout=10)
            out["fail"] = {"code": "OK"}
        except grpc.RpcError as e:
            out["fail"] = {
                "code": e.code().name,
                "details": e.details(),
                "trailers": dict(e.trailing_metadata() or ()),
            }
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "server":
        serve()
    else:
        client(sys.argv[2], sys.argv[3])
