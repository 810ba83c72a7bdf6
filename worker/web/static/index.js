// The status page, live: polls GET /ui/state (with the page's own filters) and updates
// the server-rendered page in place, row by row, so focus and scroll stay where they are.
"use strict";

(() => {
  const $ = (selector, root = document) => root.querySelector(selector);
  const f = ui.field;
  let leaderAt = 0;
  let leaderMs = 0;

  function leader(data) {
    const box = $("#leader");
    const l = data.leader;
    for (const el of box.querySelectorAll("[data-when=leader]")) el.hidden = !l;
    $("[data-when=none]", box).hidden = Boolean(l || data.leader_error);
    const error = f(box, "leader-error");
    error.textContent = data.leader_error || "";
    error.hidden = !data.leader_error;
    if (!l) return;
    $("[data-when=leader] > b", box).textContent = l.holder;
    f(box, "self").hidden = !l.self;
    f(box, "token").textContent = l.token;
    f(box, "address").textContent = l.address;
    const since = $("time", f(box, "since")) || f(box, "since").appendChild(ui.when(l.since));
    ui.setWhen(since, l.since);
    leaderAt = Date.now();
    leaderMs = l.ttl_ms;
    countdown();
  }

  // The lease's time left, counted down between polls.
  function countdown() {
    const ttl = f($("#leader"), "ttl");
    const left = leaderMs - (Date.now() - leaderAt);
    ttl.textContent = left > 0 ? `${(left / 1000).toFixed(1)} s` : "expired (no renewal seen yet)";
  }

  // Makes `tbody` hold one row per item, in order: rows are kept (and updated) by key,
  // new ones are cloned from `template`, and rows no longer listed go.
  function reconcile(tbody, items, template, fill) {
    const rows = new Map([...tbody.children].map((row) => [row.dataset.key, row]));
    let cursor = tbody.firstElementChild;
    for (const item of items) {
      const key = String(item.id);
      let row = rows.get(key);
      if (row) rows.delete(key);
      else row = template.content.firstElementChild.cloneNode(true);
      row.dataset.key = key;
      fill(row, item);
      if (row === cursor) cursor = cursor.nextElementSibling;
      else tbody.insertBefore(row, cursor);
    }
    for (const row of rows.values()) row.remove();
  }

  function fillRun(row, run) {
    const link = f(row, "link");
    link.href = `/ui/runs/${run.id}`;
    link.textContent = `#${run.id}`;
    f(row, "job").textContent = run.job;
    ui.badge(f(row, "status"), run.status);
    f(row, "cancelling").hidden = !run.cancelling;
    ui.progress(row, run);
    const counters = run.counters.map(([k, v]) => {
      const kv = document.createElement("span");
      kv.className = "kv";
      const name = document.createElement("span");
      name.className = "k";
      name.textContent = k;
      kv.append(name, ` ${v}`);
      return kv;
    });
    f(row, "counters").replaceChildren(...counters);
    ui.took(f(row, "took"), run);
    ui.setWhen($("time", row), run.created_at);
    f(row, "trigger").textContent = run.trigger;
    const cancel = $("button[data-action=cancel]", row);
    cancel.dataset.run = run.id;
    cancel.hidden = !run.active;
  }

  function fillReplica(row, r) {
    f(row, "id").textContent = r.id;
    f(row, "leader").hidden = !r.leader;
    f(row, "self").hidden = !r.self;
    f(row, "role").textContent = r.role;
    f(row, "version").textContent = r.version;
    f(row, "address").textContent = r.address;
    const [started, seen] = row.querySelectorAll("time");
    ui.setWhen(started, r.started);
    ui.setWhen(seen, r.last_seen);
  }

  function replicas(data) {
    reconcile($("#replicas tbody"), data.replicas, $("#tpl-replica"), fillReplica);
    f(document, "replica-count").textContent = data.replicas.length;
    f(document, "replicas-empty").hidden = Boolean(data.replicas.length || data.replicas_error);
    const error = f(document, "replicas-error");
    error.textContent = data.replicas_error || "";
    error.hidden = !data.replicas_error;
  }

  function note(text) {
    const span = document.createElement("span");
    span.className = "note";
    span.textContent = text;
    return span;
  }

  function lastRun(cell, run) {
    if (!run) return;
    let [badge, link, time] = [$(".s", cell), $("a", cell), $("time", cell)];
    if (!badge) {
      badge = document.createElement("span");
      link = document.createElement("a");
      time = document.createElement("time");
      cell.replaceChildren(badge, " ", link, " ", time);
    }
    ui.badge(badge, run.status);
    link.href = `/ui/runs/${run.id}`;
    link.textContent = `#${run.id}`;
    ui.setWhen(time, run.created_at);
  }

  function job(card, j) {
    f(card, "paused-badge").hidden = !j.paused;
    const paused = f(card, "paused");
    paused.textContent = j.paused ? `paused by ${j.paused_by || "someone"}${j.note ? `: ${j.note}` : ""}` : "";
    paused.hidden = !j.paused;
    const planning = f(card, "planning");
    planning.textContent = j.planning_error ? `cannot plan: ${j.planning_error}` : "";
    planning.hidden = !j.planning_error;
    f(card, "next").replaceChildren(...(j.next_slot
      ? [ui.when(j.next_slot), " ", note(j.next_local)] : ["-"]));
    lastRun(f(card, "last"), j.last_run);
    const progress = f(card, "last-progress");
    progress.hidden = !j.last_run;
    if (j.last_run) ui.progress(progress, j.last_run);
    const streak = f(card, "streak");
    streak.textContent = j.failure_streak;
    streak.className = j.failure_streak ? "err" : "";
    const gaps = f(card, "gaps");
    gaps.replaceChildren(`${j.missed} / ${j.skipped} in 24 h`,
      ...(j.last_gap ? [note(", newest "), ui.when(j.last_gap)] : []));
    gaps.className = j.missed || j.skipped ? "warn" : "";
    for (const b of card.querySelectorAll("button[data-action=pause]")) b.hidden = j.paused;
    for (const b of card.querySelectorAll("button[data-action=resume]")) b.hidden = !j.paused;
    if (card.dataset.chart !== j.chart_key) {
      card.dataset.chart = j.chart_key;
      chart(card, j.name);
    }
  }

  // A run of the job started or ended: the server renders its chart again.
  async function chart(card, name) {
    try {
      const response = await fetch(`/ui/jobs/${encodeURIComponent(name)}/chart`,
        { cache: "no-store", headers: ui.headers() });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      f(card, "chart").innerHTML = await response.text(); // our own autoescaped template
    } catch (e) {
      ui.notify(`Could not redraw the chart of ${name}: ${e.message}`, { error: true });
    }
  }

  let warnedJobs = false;
  function jobs(data) {
    const cards = new Map([...document.querySelectorAll("article[data-job]")].map((c) => [c.dataset.job, c]));
    for (const j of data.jobs) {
      const card = cards.get(j.name);
      if (card) job(card, j);
    }
    const changed = data.jobs.length !== cards.size || data.jobs.some((j) => !cards.has(j.name));
    if (changed && !warnedJobs) {
      warnedJobs = true;
      ui.notify("The jobs file changed.", { link: { href: location.href, text: "Reload to see the jobs now configured" } });
    }
  }

  function runs(data) {
    reconcile($("#attention tbody"), data.attention, $("#tpl-run"), fillRun);
    f(document, "attention-empty").hidden = data.attention.length > 0;
    reconcile($("#recent tbody"), data.runs, $("#tpl-run"), fillRun);
    f(document, "runs-empty").hidden = data.runs.length > 0;
    const older = f(document, "older");
    older.hidden = !data.older;
    if (data.older) {
      const url = new URL(older.href);
      url.searchParams.set("before", data.older);
      older.href = url.pathname + url.search;
    }
  }

  async function load() {
    const data = await ui.api("GET", `/ui/state${location.search}`);
    leader(data);
    replicas(data);
    jobs(data);
    runs(data);
    return data;
  }

  // Faster while something runs.
  const every = (data) => (data.attention.some((r) => r.active) ? 2000 : 5000);

  ui.start(() => {
    leaderAt = Date.now();
    leaderMs = Number(f($("#leader"), "ttl").dataset.ms) || 0;
    setInterval(countdown, 200);
    ui.poll(load, every);
  });
})();
