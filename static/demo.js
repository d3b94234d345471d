import notify from './notify.js';

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const ids = new Set();
/** What the page saw, for people (the log) and for the end-to-end tests. */
const demo = { client: null, user: null, apiKey: null, received: [], states: [], errors: [] };
window.notifyDemo = demo;

function log(line) {
  const el = $('log');
  el.textContent = `${new Date().toLocaleTimeString()} ${line}\n` + el.textContent.slice(0, 20000);
}

function clientOptions(token) {
  const opts = { token };
  const list = params.get('transports');
  if (list) opts.transports = list.split(',').filter(Boolean);
  for (const k of ['helloTimeout', 'probeInterval', 'backoffBase', 'backoffMax', 'pollWait', 'pongTimeout']) {
    if (params.has(k)) opts[k] = Number(params.get(k));
  }
  if (params.get('negotiate') === '0') opts.negotiate = false;
  if (params.get('share') === '0') opts.share = false;
  return opts;
}

async function signIn(user) {
  $('signin-error').textContent = '';
  const resp = await fetch(`v1/dev/token?user=${encodeURIComponent(user)}&device=demo`, { cache: 'no-store' });
  if (!resp.ok) {
    $('signin-error').textContent = resp.status === 404 ? 'The server is not in dev mode (make run).' : `Sign-in failed: HTTP ${resp.status}`;
    return;
  }
  const { token, api_key: apiKey } = await resp.json();
  if (demo.client) demo.client.close();
  demo.user = user;
  demo.apiKey = apiKey;
  localStorage.setItem('notifyd-demo-user', user);
  start(token);
}

function start(token) {
  const n = notify.connect('', clientOptions(token));
  demo.client = n;
  n.on('state', (ev) => {
    demo.states.push({ t: performance.now(), state: ev.state, transport: ev.transport, reason: ev.reason, delay: ev.delay });
    const badge = $('state');
    badge.className = `badge ${ev.state}`;
    badge.textContent = ev.state;
    $('transport').textContent = ev.transport ? `over ${ev.transport}` : '';
    $('transport-big').textContent = ev.transport || '–';
    $('session').textContent = n.session ? `session ${n.session}` : '';
    log(`${ev.state}${ev.transport ? ' over ' + ev.transport : ''} (${ev.message}${ev.delay !== undefined ? `, retry in ${ev.delay} ms` : ''})`);
  });
  n.on('attempt', (a) => log(`${a.probe ? 'probe' : 'try'} ${a.transport}: ${a.ok ? 'hello' : a.reason} after ${a.ms} ms`));
  n.on('notification', (m) => {
    demo.received.push({ id: m.id, seq: m.seq, t: performance.now(), transport: n.transport, replayed: m.replayed, recovered: !!m.recovered });
    addNote(m);
    $('received').textContent = String(demo.received.length);
    $('ttfn').textContent = `first after ${Math.round(n.timings.firstNotification - n.timings.start)} ms`;
  });
  n.on('read', (ev) => {
    for (const id of ev.ids) {
      const li = document.querySelector(`li[data-id="${CSS.escape(id)}"]`);
      if (li) markLi(li);
    }
    if (!ev.local) log(`read on another device: ${ev.ids.length} notification(s)`);
  });
  n.on('unread', (count) => { $('unread').textContent = count === null ? '–' : String(count); });
  n.on('error', (e) => { demo.errors.push(e); log(`error ${e.code}: ${e.message}`); });
  $('publish').disabled = false;
  $('read-all').disabled = false;
}

function markLi(li) {
  li.className = 'read';
  const b = li.querySelector('button');
  if (b) b.remove();
}

function addNote(m) {
  if (ids.has(m.id)) return;
  ids.add(m.id);
  $('empty')?.remove();
  const li = document.createElement('li');
  li.className = 'unread';
  li.dataset.id = m.id;
  li.dataset.seq = String(m.seq);
  const body = document.createElement('div');
  body.className = 'body';
  const topic = document.createElement('div');
  topic.className = 'topic';
  topic.textContent = `#${m.seq} ${m.topic}${m.replayed ? ' (replayed)' : ''}`;
  const data = document.createElement('div');
  data.className = 'data mono';
  data.textContent = JSON.stringify(m.data);
  body.append(topic, data);
  const when = document.createElement('span');
  when.className = 'muted mono';
  when.textContent = new Date(m.created_at).toLocaleTimeString();
  const btn = document.createElement('button');
  btn.type = 'button';
  btn.className = 'secondary';
  btn.textContent = 'mark read';
  btn.onclick = () => demo.client.markRead([m.id]).then(() => markLi(li), (err) => log(String(err)));
  li.append(body, when, btn);
  // Newest first, by seq.
  const after = [...$('notes').children].find((x) => Number(x.dataset.seq) < m.seq);
  $('notes').insertBefore(li, after || null);
}

$('signin-form').addEventListener('submit', (e) => {
  e.preventDefault();
  signIn($('user').value.trim()).catch((err) => { $('signin-error').textContent = String(err); });
});
$('publish').addEventListener('click', async () => {
  const resp = await fetch('v1/notifications', {
    method: 'POST',
    headers: { Authorization: `Bearer ${demo.apiKey}`, 'Content-Type': 'application/json' },
    body: JSON.stringify({ user_id: demo.user, topic: 'demo.test', data: { text: 'Hello from the demo page', at: new Date().toISOString() } }),
  });
  if (!resp.ok) log(`publish failed: HTTP ${resp.status}`);
});
$('read-all').addEventListener('click', () => {
  demo.client.markAllRead().then(() => document.querySelectorAll('#notes li.unread').forEach(markLi), (err) => log(String(err)));
});

$('user').value = params.get('user') || localStorage.getItem('notifyd-demo-user') || 'dev';
if (params.has('user')) signIn($('user').value).catch((err) => { $('signin-error').textContent = String(err); });
