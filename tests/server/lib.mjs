// lib.mjs - start and stop `forge serve` for the tests: $FORGE on the stories260K model of
// $FORGE_SHARED, on 127.0.0.1 with a port the system picks (--port 0; the server prints it).
import { spawn, execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';

export const FORGE = process.env.FORGE;
export const MODEL = path.join(process.env.FORGE_SHARED || '../shared', 'testdata/models/stories260K.gguf');
if (!FORGE) throw new Error('FORGE (the forge binary) is not set');

// Start a server; resolves once it listens. extra: more command-line options.
export async function startServer(extra = []) {
  const args = ['serve', '-m', MODEL, '--port', '0', '--device', 'cpu', '-t', '1', ...extra];
  const proc = spawn(FORGE, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  let log = '';
  proc.stderr.setEncoding('utf8');
  const exited = new Promise((resolve) => proc.on('exit', (code, signal) => resolve({ code, signal })));
  const port = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`server did not start:\n${log}`)), 60000);
    proc.stderr.on('data', (d) => {
      log += d;
      const m = log.match(/listening on http:\/\/[^:]+:(\d+)/);
      if (m) { clearTimeout(timer); resolve(Number(m[1])); }
    });
    exited.then((e) => { clearTimeout(timer); reject(new Error(`server exited (${e.code}):\n${log}`)); });
  });
  const url = `http://127.0.0.1:${port}`;
  return {
    url, port, proc, exited,
    log: () => log,
    // SIGTERM and wait; resolves to the exit status
    async stop(sig = 'SIGTERM') {
      if (proc.exitCode === null) proc.kill(sig);
      const e = await exited;
      return e.code;
    },
    // an ASan build (its runtime is mapped into the process)
    asan() {
      return /libasan/.test(fs.readFileSync(`/proc/${proc.pid}/maps`, 'utf8'));
    },
    rssKiB() {
      const s = fs.readFileSync(`/proc/${proc.pid}/status`, 'utf8');
      return Number(s.match(/VmRSS:\s+(\d+)/)[1]);
    },
  };
}

// What `forge run` prints for a greedy run (without the final newline).
export function forgeRun(prompt, n) {
  const out = execFileSync(FORGE, ['run', '-m', MODEL, '-p', prompt, '-n', String(n), '--temp', '0',
    '--device', 'cpu', '-t', '1'], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] });
  return out.replace(/\n$/, '');
}

// POST raw bytes; returns {status, headers, json|text}.
export async function post(url, body, headers = {}) {
  const r = await fetch(url, { method: 'POST', body, headers: { 'Content-Type': 'application/json', ...headers } });
  const text = await r.text();
  let json = null;
  try { json = JSON.parse(text); } catch { /* not JSON */ }
  return { status: r.status, headers: r.headers, text, json };
}

// Read an SSE stream of a fetch Response into the list of parsed `data:` payloads.
export async function readSSE(resp) {
  const dec = new TextDecoder();
  let buf = '';
  const events = [];
  for await (const chunk of resp.body) {
    buf += dec.decode(chunk, { stream: true });
    let i;
    while ((i = buf.indexOf('\n\n')) >= 0) {
      const ev = buf.slice(0, i);
      buf = buf.slice(i + 2);
      for (const line of ev.split('\n'))
        if (line.startsWith('data: ')) events.push(line.slice(6) === '[DONE]' ? '[DONE]' : JSON.parse(line.slice(6)));
    }
  }
  return events;
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
