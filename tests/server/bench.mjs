// bench.mjs - throughput of a running forge serve under C concurrent streaming clients (not a
// test; for docs/PERFORMANCE.md):
//   node tests/server/bench.mjs URL [CONCURRENCY...] [--requests N] [--max-tokens N] [--prompt TEXT | --prompt-tokens P]
// Prints, per concurrency: requests/s, aggregate generated tokens/s, time to first token p50/p99.
// Tokens are counted from usage (stream_options.include_usage), greedy. --prompt-tokens P sends P
// random token ids with ignore_eos, as bench/bench_engine does, to compare with it.
const args = process.argv.slice(2);
const url = args.shift();
if (!url) { console.error('usage: node bench.mjs URL [C...] [--requests N] [--max-tokens N] [--prompt T]'); process.exit(2); }
const opt = (name, def) => { const i = args.indexOf(name); if (i < 0) return def; const v = args[i + 1]; args.splice(i, 2); return v; };
const perClient = Number(opt('--requests', 8));
const maxTokens = Number(opt('--max-tokens', 64));
const promptLen = Number(opt('--prompt-tokens', 0)); // > 0: that many random token ids, ignore_eos
const prompt = opt('--prompt', 'Once upon a time');
let seed = 1;
const randomIds = () => Array.from({ length: promptLen }, () => 3 + ((seed = (seed * 1103515245 + 12345) >>> 0) % 500));
const levels = args.length ? args.map(Number) : [1, 16, 64];
const pct = (a, p) => a.length ? a.slice().sort((x, y) => x - y)[Math.min(a.length - 1, Math.floor(p * a.length))] : NaN;

async function one() {
  const t0 = performance.now();
  const r = await fetch(`${url}/v1/completions`, { method: 'POST', headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ prompt: promptLen > 0 ? randomIds() : prompt, ignore_eos: promptLen > 0, max_tokens: maxTokens,
      temperature: 0, stream: true, stream_options: { include_usage: true } }) });
  if (!r.ok) throw new Error(`HTTP ${r.status}: ${await r.text()}`);
  const dec = new TextDecoder();
  let buf = '', ttft = null, tokens = 0;
  for await (const chunk of r.body) {
    buf += dec.decode(chunk, { stream: true });
    let i;
    while ((i = buf.indexOf('\n\n')) >= 0) {
      const ev = buf.slice(0, i); buf = buf.slice(i + 2);
      if (!ev.startsWith('data: ') || ev === 'data: [DONE]') continue;
      const j = JSON.parse(ev.slice(6));
      if (ttft === null && j.choices.length && j.choices[0].text) ttft = performance.now() - t0;
      if (j.usage) tokens = j.usage.completion_tokens;
    }
  }
  return { ttft: ttft ?? performance.now() - t0, tokens };
}

for (const c of levels) {
  const ttfts = [];
  let tokens = 0;
  const t0 = performance.now();
  await Promise.all(Array.from({ length: c }, async () => {
    for (let k = 0; k < perClient; k++) { const r = await one(); ttfts.push(r.ttft); tokens += r.tokens; }
  }));
  const s = (performance.now() - t0) / 1000;
  console.log(`concurrency ${String(c).padStart(3)}: ${(c * perClient / s).toFixed(1)} req/s, ${(tokens / s).toFixed(0)} tokens/s, ` +
    `TTFT p50 ${pct(ttfts, 0.5).toFixed(1)} ms, p99 ${pct(ttfts, 0.99).toFixed(1)} ms (${c * perClient} requests, ${tokens} tokens)`);
}
