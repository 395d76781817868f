"""An unmodified app for the pod tests: a plain HTTP server and client, no proxy settings.

  pod_app.py serve NAME PORT   answers every GET with JSON saying who answered and what it
                               saw; /flaky/KEY fails with 503 the first time for each KEY
  pod_app.py get URL [HOST]    prints the status and body on one line each; HOST, if given,
                               is sent as the Host header instead of the URL's
  pod_app.py banner NAME PORT  a server-first TCP service: greets each connection at once
  pod_app.py greet HOST PORT   connects, prints the first line the server sends (waiting at
                               most 3 s) and how long it took, without sending anything
"""
import json
import socket
import socketserver
import sys
import time
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def serve(name, port):
    seen = set()
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            status = 200
            if self.path.startswith("/flaky/"):
                with lock:
                    first = self.path not in seen
                    seen.add(self.path)
                if first:
                    status = 503
            body = json.dumps({
                "pod": name,
                "path": self.path,
                "client_id": self.headers.get("x-outrigger-client-id"),
                "attempt": self.headers.get("x-outrigger-attempt"),
            }).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("0.0.0.0", int(port)), Handler)
    print("serving", flush=True)
    server.serve_forever()


def get(url, host=None):
    # No proxy from the environment: the app knows nothing of the mesh.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url, headers={"Host": host} if host else {})
    try:
        with opener.open(request, timeout=10) as r:
            status, body = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, body = e.code, e.read()
    except (urllib.error.URLError, OSError) as e:
        print("error")
        print(e)
        return
    print(status)
    print(body.decode(errors="replace"))


def banner(name, port):
    class Greeter(socketserver.BaseRequestHandler):
        def handle(self):
            self.request.sendall(f"hello from {name}\n".encode())
            self.request.recv(1)

    socketserver.ThreadingTCPServer.allow_reuse_address = True
    server = socketserver.ThreadingTCPServer(("0.0.0.0", int(port)), Greeter)
    server.serve_forever()


def greet(host, port):
    started = time.monotonic()
    try:
        with socket.create_connection((host, int(port)), timeout=3) as s:
            s.settimeout(3)
            line = s.makefile().readline().strip()
    except OSError as e:
        line = f"error {e}"
    print(line)
    print(f"{time.monotonic() - started:.3f}")


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "banner":
        banner(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "greet":
        greet(sys.argv[2], sys.argv[3])
    else:
        get(*sys.argv[2:4])
