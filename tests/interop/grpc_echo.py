"""A real gRPC server and client (grpcio) for interop tests through the proxy.

No generated code: the methods use raw bytes, so no protoc is needed.

    python grpc_echo.py server            # prints "PORT <n>" once serving on 127.0.0.1
    python grpc_echo.py client HOST:PORT AUTHORITY
                                          # runs the calls, prints one JSON object, exits 0
    python grpc_echo.py client xds:///SERVICE -
                                          # the same through xDS (GRPC_XDS_BOOTSTRAP set)
    python grpc_echo.py xds-server PORT   # an xDS-enabled server on 127.0.0.1:PORT: its
                                          # security and RBAC come from the control plane
                                          # (GRPC_XDS_BOOTSTRAP set); prints "SERVING"
    python grpc_echo.py xds-call TARGET   # one unary call with xDS credentials (or plaintext
                                          # for a host:port); prints {"code", "reply"}
    python grpc_echo.py xds-calls TARGET SECONDS
                                          # calls for that long on one channel (its load
                                          # reports go out meanwhile); prints {"ok": n}
"""

import json
import queue
import sys
from concurrent import futures

import grpc
import grpc.experimental


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


def whoami(request, context):
    # What the server learned of the caller from the handshake: its SPIFFE ID is a URI SAN.
    seen = {k: [v.decode(errors="replace") for v in vs] for k, vs in context.auth_context().items()}
    return json.dumps(seen).encode()


def xds_serve(port):
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4),
        xds=True,
    )
    handlers = {"WhoAmI": grpc.unary_unary_rpc_method_handler(whoami)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", handlers),))
    creds = grpc.xds_server_credentials(grpc.insecure_server_credentials())
    server.add_secure_port(f"127.0.0.1:{port}", creds)
    server.start()
    print("SERVING", flush=True)
    sys.stdin.read()
    server.stop(0)


def xds_call(target):
    if target.startswith("xds:"):
        creds = grpc.xds_channel_credentials(grpc.experimental.insecure_channel_credentials())
        channel = grpc.secure_channel(target, creds)
    else:
        channel = grpc.insecure_channel(target)
    with channel:
        try:
            reply = channel.unary_unary("/test.Echo/WhoAmI")(b"", timeout=10, wait_for_ready=False)
            out = {"code": "OK", "reply": json.loads(reply)}
        except grpc.RpcError as e:
            out = {"code": e.code().name, "details": e.details()}
    print(json.dumps(out), flush=True)


def xds_calls(target, seconds):
    import time

    creds = grpc.xds_channel_credentials(grpc.experimental.insecure_channel_credentials())
    ok = 0
    with grpc.secure_channel(target, creds) as channel:
        call = channel.unary_unary("/test.Echo/WhoAmI")
        end = time.monotonic() + float(seconds)
        while time.monotonic() < end:
            try:
                call(b"", timeout=10)
                ok += 1
            except grpc.RpcError:
                pass
            time.sleep(0.01)
    print(json.dumps({"ok": ok}), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "server":
        serve()
    elif sys.argv[1] == "xds-server":
        xds_serve(sys.argv[2])
    elif sys.argv[1] == "xds-call":
        xds_call(sys.argv[2])
    elif sys.argv[1] == "xds-calls":
        xds_calls(sys.argv[2], sys.argv[3])
    else:
        client(sys.argv[2], sys.argv[3])
