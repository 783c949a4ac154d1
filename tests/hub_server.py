#!/usr/bin/env python3
"""hub_server.py CONFIG.json PORTFILE LOGFILE - a fake Hugging Face hub on 127.0.0.1 for
tests/test_pull.sh. It imitates the routes and headers forge uses:

  GET  /api/models/OWNER/NAME             {"id": ..., "siblings": [{"rfilename": ...}, ...]}
  GET|HEAD /OWNER/NAME/resolve/main/FILE  302 to /cdn/OWNER/NAME/FILE with X-Linked-Etag (the
                                          sha256, quoted), X-Linked-Size and ETag, like the hub
  GET|HEAD /cdn/OWNER/NAME/FILE           the bytes; honours "Range: bytes=N-" with a 206

CONFIG is re-read on every request, so the test can change it between pulls:
  {"repos": {"OWNER/NAME": {"token": "secret" (optional: 401 without "Bearer secret"),
                            "files": {"FILE": {"path": "/local/file",
                                               "drop": 1,        (first N GETs: cut halfway)
                                               "corrupt": true,  (one byte flipped in the body)
                                               "sha": "...",     (announce another sha256)
                                               "size": N,        (announce another size)
                                               "delay": S}}}}}   (seconds between 64 KiB chunks)
The port (chosen by the OS) is written to PORTFILE; every request is logged to LOGFILE as
"METHOD PATH range=... auth=yes|no".
"""
import hashlib
import json
import os
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CONFIG, PORTFILE, LOGFILE = sys.argv[1], sys.argv[2], sys.argv[3]
drops_done = {}
lock = threading.Lock()
sha_cache = {}


def config():
    with open(CONFIG) as f:
        return json.load(f)


def sha256_of(path):
    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime_ns)
    if key not in sha_cache:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            h.update(f.read())
        sha_cache[key] = h.hexdigest()
    return sha_cache[key]


class Hub(BaseHTTPRequestHandler):
    def log_message(self, fmt, *args):
        pass

    def log(self):
        with lock, open(LOGFILE, "a") as f:
            f.write("%s %s range=%s auth=%s\n" % (self.command, self.path,
                    self.headers.get("Range", "-"),
                    "yes" if self.headers.get("Authorization") else "no"))

    def send(self, code, body=b"", headers=None, ctype="application/json"):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def authorized(self, repo):
        tok = repo.get("token")
        return not tok or self.headers.get("Authorization") == "Bearer " + tok

    def find(self, rest):
        """rest = OWNER/NAME/FILE...: (repo name, repo, file name) or Nones."""
        parts = rest.split("/", 2)
        if len(parts) < 3:
            return None, None, None
        name = parts[0] + "/" + parts[1]
        return name, config()["repos"].get(name), parts[2]

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        self.log()
        path = urllib.parse.unquote(self.path.split("?", 1)[0])
        if path.startswith("/api/models/"):
            name = path[len("/api/models/"):]
            repo = config()["repos"].get(name)
            if repo is None:
                return self.send(404, b'{"error":"Repository not found"}')
            if not self.authorized(repo):
                return self.send(401, b'{"error":"Invalid credentials"}')
            body = {"id": name, "siblings": [{"rfilename": f} for f in sorted(repo["files"])] +
                    [{"rfilename": "README.md"}, {"rfilename": "config.json"}]}
            return self.send(200, json.dumps(body).encode())
        if path.startswith("/cdn/"):
            return self.cdn(path[len("/cdn/"):])
        if "/resolve/main/" in path:
            repo_part, fname = path[1:].split("/resolve/main/", 1)
            name = repo_part
            repo = config()["repos"].get(name)
            if repo is None:
                return self.send(404, b'{"error":"Repository not found"}')
            if not self.authorized(repo):
                return self.send(401, b'{"error":"Invalid credentials"}')
            f = repo["files"].get(fname)
            if f is None:
                return self.send(404, b'{"error":"Entry not found"}')
            sha = f.get("sha") or sha256_of(f["path"])
            size = f.get("size") or os.path.getsize(f["path"])
            return self.send(302, b"", {"Location": "/cdn/%s/%s" % (name, urllib.parse.quote(fname)),
                                        "X-Linked-Etag": '"%s"' % sha,
                                        "X-Linked-Size": str(size),
                                        "ETag": '"%s"' % sha})
        return self.send(404, b'{"error":"no route"}')

    def cdn(self, rest):
        name, repo, fname = self.find(rest)
        f = repo["files"].get(fname) if repo else None
        if f is None:
            return self.send(404, b"not found", ctype="text/plain")
        with open(f["path"], "rb") as fh:
            data = bytearray(fh.read())
        if f.get("corrupt"):
            data[len(data) // 2] ^= 0xFF
        start = 0
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes=") and rng.endswith("-"):
            start = int(rng[6:-1])
            if start >= len(data):
                return self.send(416, b"", {"Content-Range": "bytes */%d" % len(data)})
        body = bytes(data[start:])
        self.send_response(206 if start else 200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", '"cdn-%s"' % sha256_of(f["path"])[:16])
        if start:
            self.send_header("Content-Range", "bytes %d-%d/%d" % (start, len(data) - 1, len(data)))
        self.end_headers()
        if self.command == "HEAD":
            return
        key = name + "/" + fname
        with lock:
            drop = drops_done.get(key, 0) < f.get("drop", 0)
            if drop:
                drops_done[key] = drops_done.get(key, 0) + 1
        if drop:
            # send half of the body, then cut the connection
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)
            return
        delay = f.get("delay", 0)
        for i in range(0, len(body), 65536):
            self.wfile.write(body[i:i + 65536])
            if delay:
                time.sleep(delay)


server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
with open(PORTFILE + ".tmp", "w") as pf:
    pf.write(str(server.server_address[1]))
os.rename(PORTFILE + ".tmp", PORTFILE)
server.serve_forever()
