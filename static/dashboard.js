const $ = (id) => document.getElementById(id);
const TRANSPORTS = ['websocket', 'sse', 'longpoll'];
const HISTORY = 120;
let key = sessionStorage.getItem('notifyd-key') || '';
let timer = null;
let last = null; // { t, deliveries }
const rates = [];
/** The latest stats, for people poking at the console and for the end-to-end tests. */
window.notifyDashboard = { stats: null, polls: 0, errors: 0 };

function setStatus(text, cls) {
  const s = $('status');
  s.textContent = text;
  s.className = `badge ${cls}`;
}

function fmtMs(v) {
  if (typeof v !== 'number') return '–';
  return v < 10 ? `${v.toFixed(1)} ms` : `${Math.round(v)} ms`;
}

function ago(iso) {
  if (!iso) return '–'; // another node's session: its last sign of life is not in Postgres
  const s = Math.max(0, Math.round((Date.now() - Date.parse(iso)) / 1000));
  if (s < 60) return `${s}s ago`;
  if (s < 3600) return `${Math.floor(s / 60)}m ago`;
  return `${Math.floor(s / 3600)}h ago`;
}

function td(text, cls) {
  const el = document.createElement('td');
  el.textContent = text;
  if (cls) el.className = cls;
  return el;
}

function render(st) {
  $('sessions').textContent = st.sessions;
  $('users').textContent = st.users;
  $('evictions').textContent = st.evictions;
  $('deliveries').textContent = `${st.deliveries} in all`;
  const lat = st.latency_ms || {};
  $('p50').textContent = fmtMs(lat.p50);
  $('p95').textContent = fmtMs(lat.p95);
  $('p99').textContent = `p99 ${fmtMs(lat.p99)}`;

  const t = performance.now();
  if (last) {
    const rate = Math.max(0, (st.deliveries - last.deliveries) / ((t - last.t) / 1000));
    rates.push(rate);
    if (rates.length > HISTORY) rates.shift();
    $('rate').textContent = rate < 10 ? rate.toFixed(1) : String(Math.round(rate));
  }
  last = { t, deliveries: st.deliveries };
  drawChart();

  const by = st.by_transport || {};
  const max = Math.max(1, ...TRANSPORTS.map((k) => by[k] || 0));
  const bars = $('bars');
  bars.replaceChildren(...TRANSPORTS.map((k) => {
    const row = document.createElement('div');
    row.className = 'row';
    const name = document.createElement('span');
    name.className = 'name';
    name.textContent = k;
    const track = document.createElement('div');
    track.className = 'track';
    const bar = document.createElement('div');
    bar.className = 'bar';
    bar.style.width = `${(100 * (by[k] || 0)) / max}%`;
    track.append(bar);
    const n = document.createElement('span');
    n.className = 'mono';
    n.dataset.transport = k;
    n.textContent = String(by[k] || 0);
    row.append(name, track, n);
    return row;
  }));

  renderNodes(st);
  const rows = (st.recent_sessions || []).map((s) => {
    const tr = document.createElement('tr');
    tr.append(td(s.id, 'mono'), td(s.user), td(s.device || '–'), td(s.transport), td(s.node || '–', 'mono'),
      td(ago(s.connected_at)), td(ago(s.last_seen_at)), td(s.remote_addr, 'mono'));
    return tr;
  });
  if (rows.length === 0) {
    const tr = document.createElement('tr');
    tr.append(td('no live sessions', 'muted'));
    rows.push(tr);
  }
  $('recent').replaceChildren(...rows);
  $('updated').textContent = `updated ${new Date().toLocaleTimeString()}`;
}

/** The per-node breakdown of a cluster (st.nodes; absent on a single node without leases). */
function renderNodes(st) {
  const card = $('nodes-card');
  if (!Array.isArray(st.nodes)) {
    card.hidden = true;
    return;
  }
  card.hidden = false;
  $('nodes').replaceChildren(...st.nodes.map((n) => {
    const tr = document.createElement('tr');
    tr.dataset.node = n.node;
    const by = n.by_transport || {};
    let state = n.draining ? 'draining' : 'serving';
    if (n.node === st.node) state += ' (this node)';
    tr.append(td(n.node, 'mono'), td(String(n.sessions)), td(String(n.users)),
      ...TRANSPORTS.map((k) => td(String(by[k] || 0))), td(state));
    return tr;
  }));
}

function drawChart() {
  const c = $('chart');
  const ctx = c.getContext('2d');
  const w = c.width;
  const h = c.height;
  ctx.clearRect(0, 0, w, h);
  const max = Math.max(1, ...rates);
  ctx.strokeStyle = '#e3e6ec';
  ctx.beginPath();
  ctx.moveTo(0, h - 0.5);
  ctx.lineTo(w, h - 0.5);
  ctx.stroke();
  if (rates.length < 2) return;
  ctx.strokeStyle = '#2f6fed';
  ctx.lineWidth = 2;
  ctx.beginPath();
  rates.forEach((r, i) => {
    const x = (i / (HISTORY - 1)) * w;
    const y = h - 4 - (r / max) * (h - 12);
    if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
  });
  ctx.stroke();
  ctx.fillStyle = '#6b7385';
  ctx.font = '11px system-ui, sans-serif';
  ctx.textAlign = 'right';
  ctx.fillText(`max ${max < 10 ? max.toFixed(1) : Math.round(max)}/s`, w - 4, 12);
}

async function poll() {
  timer = null;
  try {
    const resp = await fetch('v1/stats?recent=1', { cache: 'no-store', headers: { Authorization: `Bearer ${key}` } });
    if (resp.status === 401) {
      setStatus('key refused', 'closed');
      $('key-error').textContent = 'The server refused this key.';
      sessionStorage.removeItem('notifyd-key');
      return;
    }
    if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
    const st = await resp.json();
    window.notifyDashboard.stats = st;
    window.notifyDashboard.polls++;
    render(st);
    if (st.cluster_unavailable) setStatus('this node only: Postgres unavailable', 'reconnecting');
    else setStatus('live', 'connected');
  } catch (err) {
    window.notifyDashboard.errors++;
    setStatus(`unreachable (${err.message})`, 'reconnecting');
  }
  timer = setTimeout(poll, 1000);
}

function startPolling() {
  $('key-error').textContent = '';
  if (timer) clearTimeout(timer);
  last = null;
  rates.length = 0;
  setStatus('loading', 'connecting');
  poll();
}

$('key-form').addEventListener('submit', (e) => {
  e.preventDefault();
  key = $('key').value.trim();
  sessionStorage.setItem('notifyd-key', key);
  startPolling();
});
if (key) startPolling();
