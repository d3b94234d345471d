// drive.mjs: a small remote control of Debian's chromium for the Go end-to-end
// tests (cmd/notifyd/browser_test.go). It reads one JSON command per line on
// stdin and answers one JSON line on stdout: {"id", "ok", "value"|"error"}.
//
// Commands:
//   {"cmd":"launch","ctx":"a","proxy":"http://127.0.0.1:3128"?}  a fresh persistent context (own profile dir)
//   {"cmd":"open","ctx":"a","page":"p","url":"..."}              a new page, navigated; console errors are kept
//   {"cmd":"eval","page":"p","expr":"..."}                        the value of a JS expression in the page
//   {"cmd":"fill","page":"p","selector":"#key","value":"..."}
//   {"cmd":"click","page":"p","selector":"#go"}
//   {"cmd":"screenshot","page":"p","path":"/abs/file.png"}
//   {"cmd":"console","page":"p"}                                  console errors and page errors so far
//   {"cmd":"close","page":"p"}                                    closes the page (a tab closed by its user)
//   {"cmd":"closectx","ctx":"a"}
//   {"cmd":"quit"}
import { chromium } from 'playwright-core';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';

const executablePath = process.env.CHROMIUM || '/usr/bin/chromium';
const contexts = new Map(); // name -> { context, dir }
const pages = new Map(); // name -> { page, errors }

// Flags that keep Chromium quiet and on this machine (../../../shared/proxies/README.md).
const baseArgs = [
  '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
  '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage',
  '--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE localhost , EXCLUDE 127.0.0.1',
];

async function launch({ ctx, proxy }) {
  const dir = mkdtempSync(join(tmpdir(), 'notifyd-chromium-'));
  const args = [...baseArgs];
  if (proxy) {
    // Without the bypass list Chromium goes around the proxy for loopback and the test proves nothing.
    args.push(`--proxy-server=${proxy}`, '--proxy-bypass-list=<-loopback>');
  }
  const context = await chromium.launchPersistentContext(dir, {
    executablePath, headless: true, args, viewport: { width: 1200, height: 900 },
  });
  contexts.set(ctx, { context, dir });
  return { version: context.browser()?.version() ?? '' };
}

async function open({ ctx, page: name, url }) {
  const c = contexts.get(ctx);
  if (!c) throw new Error(`no context ${ctx}`);
  const page = await c.context.newPage();
  const entry = { page, errors: [] };
  page.on('console', (msg) => {
    if (msg.type() === 'error') entry.errors.push(`console: ${msg.text()}`);
  });
  page.on('pageerror', (err) => entry.errors.push(`pageerror: ${err.message}`));
  pages.set(name, entry);
  await page.goto(url, { waitUntil: 'load', timeout: 30000 });
  return true;
}

function pageOf(name) {
  const p = pages.get(name);
  if (!p) throw new Error(`no page ${name}`);
  return p;
}

async function closePage({ page: name }) {
  const p = pageOf(name);
  pages.delete(name);
  await p.page.close({ runBeforeUnload: false });
  return true;
}

async function closectx({ ctx }) {
  const c = contexts.get(ctx);
  if (!c) return false;
  contexts.delete(ctx);
  for (const [name, p] of pages) if (p.page.context() === c.context) pages.delete(name);
  await c.context.close();
  rmSync(c.dir, { recursive: true, force: true });
  return true;
}

const handlers = {
  launch,
  open,
  eval: ({ page, expr }) => pageOf(page).page.evaluate(expr),
  fill: ({ page, selector, value }) => pageOf(page).page.fill(selector, value).then(() => true),
  click: ({ page, selector }) => pageOf(page).page.click(selector).then(() => true),
  screenshot: ({ page, path }) => pageOf(page).page.screenshot({ path, fullPage: true }).then(() => path),
  console: ({ page }) => pageOf(page).errors.slice(),
  close: closePage,
  closectx,
  quit: async () => {
    for (const name of [...contexts.keys()]) await closectx({ ctx: name });
    setImmediate(() => process.exit(0));
    return true;
  },
};

const rl = createInterface({ input: process.stdin });
let chain = Promise.resolve();
rl.on('line', (line) => {
  if (!line.trim()) return;
  chain = chain.then(async () => {
    let msg;
    try {
      msg = JSON.parse(line);
      const fn = handlers[msg.cmd];
      if (!fn) throw new Error(`unknown command ${msg.cmd}`);
      const value = await fn(msg);
      process.stdout.write(JSON.stringify({ id: msg.id, ok: true, value: value ?? null }) + '\n');
    } catch (err) {
      process.stdout.write(JSON.stringify({ id: msg?.id, ok: false, error: String(err?.stack || err) }) + '\n');
    }
  });
});
rl.on('close', async () => {
  await chain;
  for (const name of [...contexts.keys()]) await closectx({ ctx: name }).catch(() => {});
  process.exit(0);
});
