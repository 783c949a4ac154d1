// browser.test.mjs - the chat page in a real browser: Debian's headless Chromium driven by
// puppeteer-core. Type a message, see the answer stream in, stop it, ask again, no console
// errors, Markdown rendered without letting HTML through. The screenshot is kept in
// $TEST_OUT (default: build/test-output/server/).
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import puppeteer from 'puppeteer-core';
import { startServer, sleep } from './lib.mjs';

const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const OUT = process.env.TEST_OUT || path.join(path.dirname(process.env.FORGE), 'test-output', 'server');

describe('chat page in headless Chromium', () => {
  let srv, browser, page;
  const problems = [];
  before(async () => {
    srv = await startServer([]);
    browser = await puppeteer.launch({ executablePath: CHROMIUM, headless: true,
      args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'] });
    page = await browser.newPage();
    page.on('console', (m) => { if (m.type() === 'error' || m.type() === 'warn') problems.push(`${m.type()}: ${m.text()}`); });
    page.on('pageerror', (e) => problems.push(`pageerror: ${e.message}`));
    page.on('requestfailed', (r) => { if (!/chat\/completions/.test(r.url())) problems.push(`requestfailed: ${r.url()}`); });
    await page.setViewport({ width: 1000, height: 700 });
    await page.goto(srv.url + '/', { waitUntil: 'load' });
  });
  after(async () => {
    if (browser) await browser.close();
    assert.equal(await srv.stop(), 0);
  });

  it('shows the model', async () => {
    await page.waitForFunction(() => document.getElementById('model').textContent.includes('stories260K'), { timeout: 10000 });
  });

  it('streams an answer, stops it, answers again', async () => {
    // a slow link, so the answer arrives over seconds and Stop has something to stop
    const cdp = await page.createCDPSession();
    await cdp.send('Network.enable');
    await cdp.send('Network.emulateNetworkConditions', { offline: false, latency: 0, downloadThroughput: 600, uploadThroughput: 100000 });
    await page.type('#input', 'Tell me a story about a cat.');
    await page.keyboard.press('Enter');
    await page.waitForSelector('.msg.user');
    assert.equal(await page.$eval('.msg.user', (e) => e.textContent), 'Tell me a story about a cat.');
    // part of the answer is there while it still streams
    await page.waitForFunction(() => {
      const b = document.querySelector('.msg.assistant');
      return b && b.dataset.state === 'streaming' && b.textContent.length > 3;
    }, { timeout: 20000 });
    assert.equal(await page.$eval('#stop', (b) => b.disabled), false);
    await page.click('#stop');
    await page.waitForFunction(() => document.querySelector('.msg.assistant').dataset.state === 'done', { timeout: 10000 });
    const stopped = await page.$eval('.msg.assistant .stats', (e) => e.textContent);
    assert.equal(stopped, 'stopped');
    const partial = await page.$eval('.msg.assistant', (e) => e.textContent);
    await sleep(1500);
    assert.equal(await page.$eval('.msg.assistant', (e) => e.textContent), partial, 'text grew after Stop');
    await cdp.send('Network.emulateNetworkConditions', { offline: false, latency: 0, downloadThroughput: -1, uploadThroughput: -1 });
    // a second turn, the whole conversation sent again
    await page.type('#input', 'And then?');
    await page.keyboard.press('Enter');
    await page.waitForFunction(() => {
      const b = document.querySelectorAll('.msg.assistant');
      return b.length === 2 && b[1].dataset.state === 'done';
    }, { timeout: 20000 });
    const second = await page.$$eval('.msg.assistant', (b) => [b[1].textContent, b[1].querySelector('.stats').textContent]);
    assert.match(second[1], /^\d+ tokens/);
    assert.ok(second[0].length > second[1].length, 'no answer text');
    fs.mkdirSync(OUT, { recursive: true });
    await page.screenshot({ path: path.join(OUT, 'chat.png') });
    assert.ok(fs.statSync(path.join(OUT, 'chat.png')).size > 1000);
  });

  it('renders Markdown without letting HTML through', async () => {
    const r = await page.evaluate(() => {
      const d = document.createElement('div');
      d.innerHTML = window.forgeMarkdown('<img src=x onerror="window.pwned=1"> **bold** `x<y`\n- item\n```js\n<script>alert(1)</script>\n```');
      return { img: d.querySelectorAll('img,script').length, strong: d.querySelector('strong')?.textContent,
        code: d.querySelector('p code')?.textContent, li: d.querySelector('li')?.textContent,
        pre: d.querySelector('pre')?.textContent, text: d.textContent };
    });
    assert.equal(r.img, 0);
    assert.equal(r.strong, 'bold');
    assert.equal(r.code, 'x<y');
    assert.equal(r.li, 'item');
    assert.equal(r.pre, '<script>alert(1)</script>\n');
    assert.match(r.text, /<img src=x/);
    await sleep(200);
    assert.equal(await page.evaluate(() => window.pwned), undefined);
  });

  it('no console errors', () => {
    assert.deepEqual(problems, []);
  });
});
