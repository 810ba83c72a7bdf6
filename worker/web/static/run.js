// A run's own page, live: polls GET /runs/{id} (the API's JSON) while the run is queued
// or running, and once more when the page opens (for what the server did not render,
// such as webhook deliveries).
"use strict";

(() => {
  const f = ui.field;
  const ACTIVE = ["queued", "running"];

  function cell(text, label, className) {
    const td = document.createElement("td");
    td.textContent = text ?? "";
    if (label) td.dataset.label = label;
    if (className) td.className = className;
    return td;
  }

  function note(text) {
    const span = document.createElement("span");
    span.className = "note";
    span.textContent = text;
    return span;
  }

  const shown = (v) => (v !== null && typeof v === "object" ? JSON.stringify(v) : String(v));

  function table(body, empty, rows) {
    body.replaceChildren(...rows);
    f(document, empty).hidden = rows.length > 0;
  }

  function fill(root, run) {
    const progress = run.progress || {};
    const measured = Number.isInteger(progress.done) && Number.isInteger(progress.total) && progress.total > 0;
    const view = {
      ...run,
      done: progress.done,
      total: progress.total,
      pct: measured ? Math.min(100, Math.round((100 * progress.done) / progress.total)) : null,
      message: progress.message || "",
      error: run.error || "",
    };
    ui.badge(f(root, "status"), run.status);
    f(root, "cancelling").hidden = !(run.status === "running" && run.cancel_requested_at);
    root.querySelector("button[data-action=cancel]").hidden = !ACTIVE.includes(run.status);
    ui.progress(root, view);
    for (const name of ["created_at", "started_at", "heartbeat_at", "finished_at", "cancel_requested_at"]) {
      ui.setWhen(f(document, name).querySelector("time"), run[name]);
    }
    ui.took(f(document, "took"), run);

    const stats = { ...(run.stats || {}) };
    const sample = stats.failed_sample || [];
    delete stats.failed_sample;
    table(f(document, "stats"), "stats-empty", Object.entries(stats).map(([k, v]) => {
      const tr = document.createElement("tr");
      const th = document.createElement("th");
      th.scope = "row";
      th.textContent = k;
      tr.append(th, cell(shown(v)));
      return tr;
    }));
    table(f(document, "sample"), "sample-empty", sample.map((item) => {
      const tr = document.createElement("tr");
      const code = document.createElement("code");
      code.textContent = item && typeof item === "object" ? item.id ?? "" : shown(item);
      const id = cell("", "Item");
      id.append(code);
      tr.append(id, cell(item && item.reason, "Reason"));
      return tr;
    }));
    f(document, "cursor").textContent = run.cursor == null ? "none" : JSON.stringify(run.cursor, null, 2);
    f(document, "result").textContent = run.result == null ? "none" : JSON.stringify(run.result, null, 2);
    table(f(document, "webhooks"), "webhooks-empty", (run.webhooks || []).map((w) => {
      const tr = document.createElement("tr");
      const status = cell(w.state || w.status, "Status");
      if (w.last_status) status.append(" ", note(`HTTP ${w.last_status}`));
      const delivered = cell("", "Delivered");
      if (w.delivered_at) delivered.append(ui.when(w.delivered_at));
      else if (w.next_attempt_at) delivered.append(note("next try "), ui.when(w.next_attempt_at));
      else delivered.textContent = "-";
      tr.append(cell(w.event, "Event"), cell(w.url, "URL", "addr"), status,
        cell(w.attempts, "Attempts", "n"), cell(w.last_error, "Last error"), delivered);
      return tr;
    }));
  }

  ui.start(() => {
    const root = document.getElementById("run");
    if (!root) return; // no such run
    const id = root.dataset.run;
    ui.poll(async () => {
      const run = await ui.api("GET", `/runs/${id}`);
      fill(root, run);
      return run;
    }, (run) => (ACTIVE.includes(run.status) ? 2000 : 30000));
  });
})();
