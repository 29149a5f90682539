"""GET /: a small live dashboard of workers, models and load (refreshes itself every second)."""

import json

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>llm-cluster</title>
<style>
 body{font:14px system-ui,sans-serif;margin:24px;color:#222} h1{font-size:20px}
 table{border-collapse:collapse;width:100%} th,td{border-bottom:1px solid #ddd;padding:6px 8px;text-align:left}
 th{background:#f5f5f5} .ready{color:#080} .draining{color:#b60} .muted{color:#888} code{font-size:12px}
</style></head>
<body>
<h1>llm-cluster</h1>
<p><span id="summary" class="muted">loading...</span></p>
<h2>Models</h2><table><thead><tr><th>model</th><th>workers</th></tr></thead><tbody id="models"></tbody></table>
<h2>Workers</h2>
<table><thead><tr><th>id</th><th>url</th><th>models</th><th>status</th><th>in flight</th>
<th>load (running / waiting / KV)</th><th>last heartbeat</th></tr></thead><tbody id="workers"></tbody></table>
<script>
const key = new URLSearchParams(location.hash.slice(1)).get("key");
const root = __ROOT_PATH__;  // the server's --root-path: the page may be served below a prefix
function cell(tr, text, cls) { const td = document.createElement("td"); td.textContent = text;
  if (cls) td.className = cls; tr.appendChild(td); }
async function refresh() {
  try {
    const r = await fetch(root + "/workers", {headers: key ? {Authorization: "Bearer " + key} : {}});
    if (!r.ok) throw new Error("HTTP " + r.status);
    const workers = await r.json();
    const wt = document.getElementById("workers"); wt.replaceChildren();
    const models = {};
    for (const w of workers) {
      const tr = document.createElement("tr"); tr.className = "worker-row"; tr.dataset.id = w.id;
      cell(tr, w.id); cell(tr, w.url); cell(tr, w.models.join(", ")); cell(tr, w.status, w.status);
      cell(tr, String(w.inflight));
      cell(tr, Object.entries(w.load || {}).map(([m, l]) => `${m}: ${l.num_running ?? 0} / ` +
        `${l.num_waiting ?? 0} / ${Math.round(100 * (l.kv_cache_usage ?? 0))}%`).join("; "));
      cell(tr, Math.max(0, Date.now() / 1000 - w.last_heartbeat).toFixed(1) + " s ago", "muted");
      wt.appendChild(tr);
      for (const m of w.models) (models[m] ||= []).push(w.id);
    }
    const mt = document.getElementById("models"); mt.replaceChildren();
    for (const [m, ids] of Object.entries(models)) { const tr = document.createElement("tr");
      cell(tr, m); cell(tr, ids.join(", ")); mt.appendChild(tr); }
    document.getElementById("summary").textContent =
      `${workers.length} worker(s), ${Object.keys(models).length} model(s), updated ${new Date().toLocaleTimeString()}`;
  } catch (e) { document.getElementById("summary").textContent = "error: " + e.message; }
}
refresh(); setInterval(refresh, 1000);
</script></body></html>
"""


def page(root_path: str) -> str:
    """The dashboard for a server below ``root_path`` ("" at the top)."""
    return PAGE.replace("__ROOT_PATH__", json.dumps(root_path).replace("<", "\\u003c"))
