// load.test.mjs - 1000 requests, 64 at a time, on 127.0.0.1: 10% of the clients disconnect
// mid-stream, 2% send bodies over --max-body, 3% malformed JSON, the rest greedy completions
// and chats (streaming and not) through the official client. The server must stay up, every
// completed greedy answer must equal the answer the same request gets alone, the server's
// memory must come back to its baseline, and it must exit 0 (under ASan: no leak).
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import OpenAI from 'openai';
import { startServer, post, sleep } from './lib.mjs';

const N = Number(process.env.LOAD_REQUESTS || 1000);
const CONCURRENCY = 64;
const PROMPTS = ['Once upon a time', 'The little dog', 'Lily and Ben', 'One day', 'The sun was', 'Tom had a', 'She saw a big', 'In the park'];

describe(`load: ${N} requests, ${CONCURRENCY} concurrent`, () => {
  let srv, client, model;
  before(async () => {
    srv = await startServer(['--max-body', '65536', '--http-threads', '4', '--max-queue', '512']);
    client = new OpenAI({ baseURL: `${srv.url}/v1`, apiKey: 'none', maxRetries: 0, timeout: 120000 });
    model = (await client.models.list()).data[0].id;
  });
  after(async () => {
    if (srv) assert.equal(await srv.stop(), 0, `exit status (ASan: a leak?), log tail:\n${srv.log().slice(-3000)}`);
  });

  it('stays up, greedy answers equal alone, memory back to baseline', async () => {
    // the answers alone, one request at a time
    const ref = new Map();
    const job = (i) => ({ p: PROMPTS[i % PROMPTS.length], n: 8 + (i % 5) * 8, chat: i % 2 === 1, stream: i % 4 >= 2 });
    const key = (j) => `${j.chat}|${j.p}|${j.n}`;
    const run = async (j) => {
      const args = { model, max_tokens: j.n, temperature: 0 };
      if (j.chat) {
        if (!j.stream) return (await client.chat.completions.create({ ...args, messages: [{ role: 'user', content: j.p }] })).choices[0].message.content;
        let t = '';
        for await (const c of await client.chat.completions.create({ ...args, messages: [{ role: 'user', content: j.p }], stream: true }))
          t += c.choices[0]?.delta?.content ?? '';
        return t;
      }
      if (!j.stream) return (await client.completions.create({ ...args, prompt: j.p })).choices[0].text;
      let t = '';
      for await (const c of await client.completions.create({ ...args, prompt: j.p, stream: true })) t += c.choices[0]?.text ?? '';
      return t;
    };
    for (let i = 0; i < 200; i++) {
      const j = job(i);
      if (!ref.has(key(j))) ref.set(key(j), await run({ ...j, stream: false }));
    }
    const rss0 = srv.rssKiB();

    const t0 = Date.now();
    const counts = { ok: 0, disconnected: 0, too_large: 0, malformed: 0, mismatch: 0, other: [] };
    let next = 0;
    const worker = async () => {
      while (next < N) {
        const i = next++;
        const kind = i % 100;
        try {
          if (kind < 10) { // a client that goes away after its first bytes
            const ac = new AbortController();
            const r = await fetch(`${srv.url}/v1/completions`, { method: 'POST', signal: ac.signal,
              headers: { 'Content-Type': 'application/json' },
              body: JSON.stringify({ prompt: PROMPTS[i % 8], max_tokens: 100, temperature: 0, stream: true }) });
            await r.body.getReader().read();
            ac.abort();
            counts.disconnected++;
          } else if (kind < 12) {
            const r = await post(`${srv.url}/v1/completions`, JSON.stringify({ prompt: 'x'.repeat(100000) }));
            if (r.status === 413) counts.too_large++; else counts.other.push(`oversize: ${r.status}`);
          } else if (kind < 15) {
            const r = await post(`${srv.url}/v1/chat/completions`, ['{"messages": [', '{"messages":"x"}', '\u0000\u0001'][kind - 12]);
            if (r.status === 400) counts.malformed++; else counts.other.push(`malformed: ${r.status}`);
          } else {
            const j = job(i);
            const got = await run(j);
            if (got === ref.get(key(j))) counts.ok++;
            else { counts.mismatch++; counts.other.push(`mismatch ${key(j)} stream=${j.stream}: ${JSON.stringify(got)} vs ${JSON.stringify(ref.get(key(j)))}`); }
          }
        } catch (e) {
          counts.other.push(`request ${i}: ${e.message}`);
        }
      }
    };
    await Promise.all(Array.from({ length: CONCURRENCY }, worker));
    const secs = (Date.now() - t0) / 1000;
    console.log(`load: ${N} requests in ${secs.toFixed(1)} s (${(N / secs).toFixed(0)} req/s): ${JSON.stringify({ ...counts, other: counts.other.length })}`);
    assert.deepEqual(counts.other.slice(0, 5), []);
    assert.equal(counts.ok + counts.disconnected + counts.too_large + counts.malformed, N);
    assert.ok(secs < 120, `took ${secs} s`);

    // the server is still up and idle again
    assert.equal((await fetch(`${srv.url}/health`)).status, 200);
    let m = '';
    for (let k = 0; k < 100; k++) {
      m = await (await fetch(`${srv.url}/metrics`)).text();
      if (/^forge_active_requests 0$/m.test(m) && /^forge_queue_depth 0$/m.test(m) && /^forge_running_sequences 0$/m.test(m)) break;
      await sleep(50);
    }
    assert.match(m, /^forge_active_requests 0$/m);
    assert.match(m, /^forge_running_sequences 0$/m);
    assert.match(m, /^forge_kv_blocks_used 0$/m);
    // memory: the same work again must not grow it (no per-request leak), and it stays near the start
    const rss1 = srv.rssKiB();
    const again = await Promise.all(Array.from({ length: 64 }, (_, i) => run(job(i * 3 + 15))));
    for (let i = 0; i < 64; i++) assert.equal(again[i], ref.get(key(job(i * 3 + 15))));
    const rss2 = srv.rssKiB();
    console.log(`load: RSS ${rss0} KiB before, ${rss1} KiB after, ${rss2} KiB after 64 more`);
    // ASan keeps freed memory in quarantine, so its RSS says nothing: there, LeakSanitizer at
    // exit (after() wants exit status 0) is the check
    if (!srv.asan()) {
      assert.ok(rss1 - rss0 < 64 * 1024, `RSS grew from ${rss0} to ${rss1} KiB`);
      assert.ok(rss2 - rss1 < 8 * 1024, `RSS grew from ${rss1} to ${rss2} KiB`);
    }
  });
});
