#!/usr/bin/env python3
"""serve_load.py - throughput of a running `forge serve` under C concurrent streaming clients, for
docs/PERFORMANCE.md (not a test). The same measurement as tests/server/bench.mjs, in Python's
standard library only, for machines without Node (the GPU machine):

    python3 bench/serve_load.py URL [C ...] [--requests N] [--max-tokens N]
                                [--prompt TEXT | --prompt-tokens P]

Per concurrency C: C threads, each sending N streaming completions one after the other (greedy,
stream_options.include_usage); prints requests/s, aggregate generated tokens/s (from usage),
time to first token p50/p99 and the wall time. --prompt-tokens P sends P random token ids with
ignore_eos, as `forge bench --parallel` does, so the two figures compare. TTFT is the first
chunk with text: tokens whose text is an unfinished UTF-8 sequence send no chunk, so with a
byte vocabulary and random ids (forge synth) it can come at the end of the request; the
server's /metrics histogram forge_time_to_first_token_seconds counts the first token. One line
per C:
    serve C=16: 64 requests in 9.81 s: 6.52 req/s, 835.4 tok/s, TTFT p50 61.2 ms p99 120.3 ms
and a JSON line per C after it. Exit 1 if any request failed (the first error is printed).
"""
import argparse
import http.client
import json
import sys
import threading
import time
import urllib.parse


def pct(a, p):
    if not a:
        return float("nan")
    s = sorted(a)
    return s[min(len(s) - 1, int(p * len(s)))]


class Ids:
    """the same linear congruential ids as bench.mjs (3 .. 502), one sequence for all threads"""

    def __init__(self):
        self.seed = 1
        self.lock = threading.Lock()

    def take(self, n):
        out = []
        with self.lock:
            for _ in range(n):
                self.seed = (self.seed * 1103515245 + 12345) & 0xFFFFFFFF
                out.append(3 + self.seed % 500)
        return out


def one(host, port, body):
    """one streaming request: (ttft seconds, completion tokens)"""
    t0 = time.perf_counter()
    c = http.client.HTTPConnection(host, port, timeout=600)
    c.request("POST", "/v1/completions", body=json.dumps(body),
              headers={"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:300]!r}")
    ttft, tokens, buf = None, 0, b""
    while True:
        chunk = r.read1(65536)
        if not chunk:
            break
        buf += chunk
        while True:
            i = buf.find(b"\n\n")
            if i < 0:
                break
            ev, buf = buf[:i], buf[i + 2:]
            if not ev.startswith(b"data: ") or ev == b"data: [DONE]":
                continue
            j = json.loads(ev[6:])
            if ttft is None and j.get("choices") and j["choices"][0].get("text"):
                ttft = time.perf_counter() - t0
            if j.get("usage"):
                tokens = j["usage"]["completion_tokens"]
    c.close()
    return (ttft if ttft is not None else time.perf_counter() - t0), tokens


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("url")
    ap.add_argument("levels", nargs="*", type=int, default=[1, 16, 64])
    ap.add_argument("--requests", type=int, default=8, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt", default="Once upon a time")
    ap.add_argument("--prompt-tokens", type=int, default=0)
    a = ap.parse_args()
    u = urllib.parse.urlparse(a.url)
    host, port = u.hostname, u.port or 80
    ids = Ids()
    failed = False
    for C in a.levels:
        ttfts, toks, errs = [], [], []
        lock = threading.Lock()

        def client():
            for _ in range(a.requests):
                body = {"prompt": ids.take(a.prompt_tokens) if a.prompt_tokens > 0 else a.prompt,
                        "ignore_eos": a.prompt_tokens > 0, "max_tokens": a.max_tokens,
                        "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
                try:
                    t, n = one(host, port, body)
                except Exception as e:  # noqa: BLE001 - reported below, the run goes on
                    with lock:
                        errs.append(str(e))
                    return
                with lock:
                    ttfts.append(t)
                    toks.append(n)

        th = [threading.Thread(target=client) for _ in range(C)]
        t0 = time.perf_counter()
        for t in th:
            t.start()
        for t in th:
            t.join()
        wall = time.perf_counter() - t0
        n = len(toks)
        r = {"concurrency": C, "requests": n, "failed": len(errs), "wall_s": round(wall, 3),
             "req_per_s": n / wall, "tok_per_s": sum(toks) / wall,
             "ttft_p50_ms": pct(ttfts, 0.5) * 1e3, "ttft_p99_ms": pct(ttfts, 0.99) * 1e3}
        print(f"serve C={C}: {n} requests in {wall:.2f} s: {r['req_per_s']:.2f} req/s, "
              f"{r['tok_per_s']:.1f} tok/s, TTFT p50 {r['ttft_p50_ms']:.1f} ms p99 "
              f"{r['ttft_p99_ms']:.1f} ms" + (f", {len(errs)} FAILED: {errs[0]}" if errs else ""))
        print(json.dumps(r))
        sys.stdout.flush()
        failed |= bool(errs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
