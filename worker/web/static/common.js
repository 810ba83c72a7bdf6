// What both pages share: the API key, calls to the API, notices, times, dialogs and
// the actions behind them. Plain JavaScript, no build step. Text reaches the page only
// through textContent, never innerHTML, except for the server's own escaped chart.
"use strict";

const ui = (window.ui = {});
const KEY = "worker-api-key";

// --- the API key: asked once, kept in this tab (sessionStorage), sent as a header ---
// Never in a URL: URLs end up in logs, history and Referer headers.

ui.key = () => sessionStorage.getItem(KEY) || "";
// Sent with every call once set: actions need the API key, and reads need a key too
// where the worker requires one (WORKER_READ_KEY; the read key or the API key).
ui.headers = () => (ui.key() ? { "X-API-Key": ui.key() } : {});

function showKey() {
  const has = Boolean(ui.key());
  document.body.classList.toggle("has-key", has);
  document.getElementById("key-state").textContent = has ? "API key set" : "read-only";
  document.getElementById("key-set").hidden = has;
  document.getElementById("key-forget").hidden = !has;
}

// Asks for the key; `reason` says why when the worker refused a read (HTTP 401). A key
// saved unlocks a locked page, or makes the page poll again at once.
function askKey(reason = "") {
  const dialog = document.getElementById("key-dialog");
  if (dialog.open) return;
  const input = document.getElementById("key-input");
  const why = document.getElementById("key-reason");
  why.textContent = reason;
  why.hidden = !reason;
  input.value = "";
  open(dialog, () => {
    const saved = dialog.returnValue === "ok" && input.value.trim();
    if (saved) {
      sessionStorage.setItem(KEY, input.value.trim());
      ui.notify("Key saved for this tab.");
    }
    input.value = "";
    showKey();
    if (saved && locked()) unlock();
    else if (saved && ui.refresh) ui.refresh();
  });
}

// --- a locked page: the worker requires a key to read (WORKER_READ_KEY) ---------------
// Without one the server sends the page without its data (<main data-locked>); once a
// key is known the page loads itself again with it and swaps its data in.

const starts = [];
const locked = () => document.getElementById("main").hasAttribute("data-locked");

// The page's own script starts with `fn` once the page holds its data.
ui.start = (fn) => starts.push(fn);

async function unlock() {
  const why = document.getElementById("locked-why");
  const say = (text) => {
    why.textContent = text;
    why.hidden = !text;
  };
  if (!ui.key()) {
    askKey("This worker needs a key to show its data: the read key (WORKER_READ_KEY) or the API key.");
    return;
  }
  let response;
  try {
    response = await fetch(location.href, {
      headers: { Accept: "text/html", ...ui.headers() }, cache: "no-store",
      credentials: "same-origin", signal: AbortSignal.timeout(15000),
    });
  } catch (e) {
    say(`Cannot reach the worker (${e.message}).`);
    return;
  }
  const page = new DOMParser().parseFromString(await response.text(), "text/html");
  const main = page.getElementById("main");
  if (!main) {
    say(`The page could not be loaded (HTTP ${response.status}).`);
    return;
  }
  if (main.hasAttribute("data-locked")) {
    say("The key was refused: it is neither the read key nor the API key.");
    askKey(why.textContent);
    return;
  }
  // Our own autoescaped page; its scripts are ours and already loaded.
  document.getElementById("main").replaceWith(document.adoptNode(main));
  document.getElementById("sub").replaceWith(document.adoptNode(page.getElementById("sub")));
  document.title = page.title;
  for (const fn of starts.splice(0)) fn();
}

// --- calls -------------------------------------------------------------------------

// The JSON answer, or an Error whose message is the API's own (never swallowed).
ui.api = async (method, path, body) => {
  if (method !== "GET" && !ui.key()) throw new Error("Enter the API key first.");
  const headers = { Accept: "application/json", ...ui.headers() };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, {
      method, headers, cache: "no-store", credentials: "same-origin",
      body: body === undefined ? undefined : JSON.stringify(body),
      signal: AbortSignal.timeout(15000),
    });
  } catch (e) {
    throw new Error(e.name === "TimeoutError" ? `No answer from ${path} within 15 s.`
      : `Cannot reach the worker (${e.message}).`);
  }
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = null; }
  if (!response.ok) {
    const error = new Error(data && data.error
      ? `${data.error.message} (HTTP ${response.status}, ${data.error.code})`
      : `HTTP ${response.status} from ${method} ${path}: ${text.slice(0, 200)}`);
    error.status = response.status;
    throw error;
  }
  return data;
};

// --- notices: successes fade, errors stay until dismissed ----------------------------

ui.notify = (text, { error = false, link = null } = {}) => {
  const box = document.createElement("div");
  box.className = error ? "notice error" : "notice";
  box.setAttribute("role", error ? "alert" : "status");
  const p = document.createElement("p");
  p.textContent = text;
  if (link) {
    const a = document.createElement("a");
    a.href = link.href;
    a.textContent = link.text;
    p.append(" ", a);
  }
  const close = document.createElement("button");
  close.type = "button";
  close.textContent = "×";
  close.setAttribute("aria-label", "Dismiss");
  close.addEventListener("click", () => box.remove());
  box.append(p, close);
  document.getElementById("notices").append(box);
  if (!error) setTimeout(() => box.remove(), 8000);
};

// --- times -------------------------------------------------------------------------

ui.duration = (seconds, short = false) => {
  if (seconds === null || seconds === undefined || Number.isNaN(seconds)) return "-";
  if (seconds < 10 && !short) return `${seconds.toFixed(1)}s`;
  if (seconds < 90) return `${Math.round(seconds)}s`;
  let minutes = Math.floor(Math.round(seconds) / 60);
  const sec = Math.round(seconds) % 60;
  if (minutes < 60) return short ? `${minutes}m` : `${minutes}m ${String(sec).padStart(2, "0")}s`;
  const hours = Math.floor(minutes / 60);
  minutes %= 60;
  if (hours < 48) return short ? `${hours}h` : `${hours}h ${String(minutes).padStart(2, "0")}m`;
  return `${Math.floor(hours / 24)}d`;
};

ui.ago = (iso) => {
  if (!iso) return "-";
  const seconds = (Date.now() - Date.parse(iso)) / 1000;
  const text = ui.duration(Math.abs(seconds), true);
  return seconds < 0 ? `in ${text}` : `${text} ago`;
};

ui.stamp = (iso) => (iso ? `${new Date(iso).toISOString().slice(0, 19).replace("T", " ")} UTC` : "-");

// A <time data-rel> element showing `iso` relatively (the server renders the same).
ui.when = (iso) => {
  const t = document.createElement("time");
  ui.setWhen(t, iso);
  return t;
};
ui.setWhen = (t, iso) => {
  t.setAttribute("datetime", iso || "");
  t.dataset.rel = "";
  t.title = ui.stamp(iso);
  t.textContent = ui.ago(iso);
};

// Every second: relative times, and the running time of runs still going.
function tick() {
  for (const t of document.querySelectorAll("time[data-rel]")) {
    t.textContent = ui.ago(t.getAttribute("datetime"));
  }
  for (const s of document.querySelectorAll("[data-f=took][data-start]")) {
    if (s.dataset.start && !s.dataset.end) {
      s.textContent = ui.duration((Date.now() - Date.parse(s.dataset.start)) / 1000);
    }
  }
}

// --- filling server-rendered pieces from the API's JSON ----------------------------

ui.field = (root, name) => root.querySelector(`[data-f="${name}"]`);

ui.badge = (el, status) => {
  el.className = `s ${status}`;
  el.textContent = status;
};

// The progress block of a run (see the `progress` macro): `run` has pct, done, total,
// message, error and status.
ui.progress = (root, run) => {
  const bar = ui.field(root, "bar");
  bar.setAttribute("aria-label", `progress of run #${run.id}`);
  const measured = run.pct !== null && run.pct !== undefined;
  bar.hidden = !measured && run.status !== "running";
  bar.classList.toggle("busy", !measured && run.status === "running");
  if (measured) bar.setAttribute("aria-valuenow", run.pct); else bar.removeAttribute("aria-valuenow");
  bar.firstElementChild.style.width = `${measured ? run.pct : 0}%`;
  ui.field(root, "pct").textContent = measured ? `${run.pct}% (${run.done} of ${run.total})` : "";
  ui.field(root, "message").textContent = run.message || "";
  const error = ui.field(root, "error");
  error.textContent = run.error || "";
  error.hidden = !run.error;
};

ui.took = (el, run) => {
  el.dataset.start = run.started_at || "";
  el.dataset.end = run.finished_at || "";
  el.textContent = run.finished_at ? ui.duration(run.duration)
    : run.started_at ? ui.duration((Date.now() - Date.parse(run.started_at)) / 1000) : "-";
};

// --- dialogs: native modal <dialog> keeps focus inside; focus goes back on close -------

// A modal <dialog> makes the page behind it inert; Tab past its last control would still
// leave for the browser's own UI, so it wraps round to the first (and Shift+Tab back).
function trap(event) {
  if (event.key !== "Tab") return;
  const controls = [...event.currentTarget.querySelectorAll("button, input, textarea, select, a[href]")]
    .filter((el) => !el.disabled && !el.hidden && el.offsetParent !== null);
  const [first, last] = [controls[0], controls[controls.length - 1]];
  if (event.shiftKey && document.activeElement === first) {
    event.preventDefault();
    last.focus();
  } else if (!event.shiftKey && document.activeElement === last) {
    event.preventDefault();
    first.focus();
  }
}

function open(dialog, onClose) {
  const opener = document.activeElement;
  dialog.addEventListener("close", () => {
    onClose();
    const back = opener && opener.isConnected && !opener.hidden ? opener : document.getElementById("main");
    back.focus();
  }, { once: true });
  dialog.returnValue = "";
  dialog.showModal();
}

// Ask before an action; `spec` has title, text, ok, fields, send(values) and done(answer).
// Errors stay in the dialog, which stays open, so nothing is lost or hidden.
ui.confirm = (spec) => {
  const dialog = document.getElementById("confirm");
  const form = dialog.querySelector("form");
  const ok = document.getElementById("confirm-ok");
  const no = document.getElementById("confirm-no");
  const error = document.getElementById("confirm-error");
  const fields = document.getElementById("confirm-fields");
  document.getElementById("confirm-title").textContent = spec.title;
  document.getElementById("confirm-text").textContent = spec.text;
  ok.textContent = spec.ok;
  ok.classList.toggle("danger", Boolean(spec.danger));
  no.textContent = spec.no || "Cancel";
  error.hidden = true;
  fields.replaceChildren(...(spec.fields || []).map(makeField));
  ok.disabled = false;

  const submit = async (event) => {
    if (event.submitter !== ok) return; // the dismiss button closes the dialog
    event.preventDefault();
    if (!form.reportValidity()) return;
    const values = {};
    for (const f of spec.fields || []) values[f.name] = form.elements[f.name].value;
    ok.disabled = true;
    error.hidden = true;
    try {
      const answer = await spec.send(values);
      dialog.close("done");
      const message = spec.done(answer);
      ui.notify(message.text || message, { link: message.link });
      if (ui.refresh) ui.refresh();
    } catch (e) {
      error.textContent = e.status === 401 || e.status === 403
        ? `${e.message} Check the API key ("Forget key", then enter it again).` : e.message;
      error.hidden = false;
      ok.disabled = false;
    }
  };
  form.addEventListener("submit", submit);
  open(dialog, () => form.removeEventListener("submit", submit));
  const first = fields.querySelector("input, textarea");
  (first || (spec.danger ? no : ok)).focus();
};

function makeField(f) {
  const wrap = document.createElement("div");
  const id = `field-${f.name}`;
  const label = document.createElement("label");
  label.htmlFor = id;
  label.textContent = f.label;
  const input = document.createElement(f.type === "textarea" ? "textarea" : "input");
  if (f.type !== "textarea") input.type = f.type || "text";
  Object.assign(input, { id, name: f.name, value: f.value || "", required: Boolean(f.required) });
  for (const attr of ["min", "max", "maxLength", "step"]) if (f[attr] !== undefined) input[attr] = f[attr];
  wrap.append(label, input);
  if (f.hint) {
    const hint = document.createElement("p");
    hint.className = "hint";
    hint.id = `${id}-hint`;
    hint.textContent = f.hint;
    input.setAttribute("aria-describedby", hint.id);
    wrap.append(hint);
  }
  return wrap;
}

// --- actions: each button names one with data-action ----------------------------------

const path = (name) => encodeURIComponent(name);
const runLink = (id) => ({ href: `/ui/runs/${id}`, text: `Open run #${id}` });

const ACTIONS = {
  cancel: ({ run }) => ({
    title: `Cancel run #${run}?`,
    text: "A queued run is cancelled at once. A running run stops at its next checkpoint and is recorded as cancelled.",
    ok: "Cancel the run", no: "Keep it", danger: true,
    send: () => ui.api("POST", `/runs/${run}/cancel`),
    done: (a) => (a.status === "cancelled" ? `Run #${run} cancelled.` : `Run #${run} is being cancelled.`),
  }),
  trigger: ({ job }) => ({
    title: `Run ${job} now?`,
    text: "This queues a run of the job now; the leader starts it as the job's overlap policy allows.",
    ok: "Run now",
    send: () => ui.api("POST", `/jobs/${path(job)}/trigger`),
    done: (a) => ({ text: `Run #${a.run_id} of ${job} queued.`, link: runLink(a.run_id) }),
  }),
  pause: ({ job }) => ({
    title: `Pause ${job}?`,
    text: "Its slots are not run, and not owed later, until it is resumed. Runs already going are not stopped.",
    ok: "Pause", danger: true,
    fields: [{ name: "note", label: "Why (shown on this page)", type: "textarea", maxLength: 500 }],
    send: (v) => ui.api("POST", `/jobs/${path(job)}/pause`, { note: v.note }),
    done: () => `${job} paused.`,
  }),
  resume: ({ job }) => ({
    title: `Resume ${job}?`,
    text: "Its slots from now on run; the slots that passed while it was paused are not owed.",
    ok: "Resume",
    send: () => ui.api("POST", `/jobs/${path(job)}/resume`),
    done: () => `${job} resumed.`,
  }),
  backfill: ({ job }) => ({
    title: `Backfill ${job}?`,
    text: "Queues a run for every slot of the job's schedule in the range (dates are midnight in the job's timezone). A slot that already has a run is skipped.",
    ok: "Queue the slots",
    fields: [
      { name: "from", label: "From (first day)", type: "date", required: true },
      { name: "to", label: "To (last day, included)", type: "date", required: true },
    ],
    send: (v) => ui.api("POST", `/jobs/${path(job)}/backfill`, { from: v.from, to: v.to }),
    done: (a) => `Backfill of ${job}: ${a.queued} slot(s) queued, ${a.skipped} already had a run.`,
  }),
  cleanup: () => ({
    title: "Clean up stuck runs?",
    text: "Every run marked running for longer than this whose heartbeat has stopped is marked failed, and not resumed. A run whose heartbeat is fresh is never touched.",
    ok: "Clean up", danger: true,
    fields: [{ name: "timeout_minutes", label: "Running for more than (minutes)", type: "number", value: "15", min: 5, max: 60, step: 1, required: true, hint: "From 5 to 60." }],
    send: (v) => ui.api("POST", `/runs/cleanup-stuck?timeout_minutes=${encodeURIComponent(v.timeout_minutes)}`),
    done: (a) => (a.count ? `${a.count} stuck run(s) marked failed: #${a.ids.join(", #")}.` : "No stuck runs found."),
  }),
};

document.addEventListener("click", (event) => {
  const button = event.target.closest("button[data-action]");
  if (!button) return;
  const make = ACTIONS[button.dataset.action];
  if (!ui.key()) { askKey(); return; }
  ui.confirm(make(button.dataset));
});

document.addEventListener("DOMContentLoaded", () => {
  for (const dialog of document.querySelectorAll("dialog")) dialog.addEventListener("keydown", trap);
  document.getElementById("key-set").addEventListener("click", () => askKey());
  const unlocker = document.getElementById("key-unlock");
  if (unlocker) unlocker.addEventListener("click", () => (ui.key() ? unlock() : askKey()));
  document.getElementById("key-forget").addEventListener("click", () => {
    sessionStorage.removeItem(KEY);
    showKey();
    ui.notify("API key forgotten: the page is read-only.");
    document.getElementById("key-set").focus();
  });
  showKey();
  setInterval(tick, 1000);
  if (locked()) unlock();
  else for (const fn of starts.splice(0)) fn();
});

// Polls `load` now and again every `every(data)` ms while the tab is visible; `ui.refresh`
// polls at once (after an action). The header says when the page was last updated.
ui.poll = (load, every) => {
  let timer = null;
  let last = Date.now();
  let wait = 5000;
  const live = document.getElementById("live");
  const banner = document.getElementById("live-error");
  const run = async () => {
    clearTimeout(timer);
    try {
      const data = await load();
      last = Date.now();
      banner.hidden = true;
      wait = every(data);
    } catch (e) {
      if (e.status === 401) {
        // The worker requires a key to read: no retrying until one is given.
        banner.textContent = ui.key()
          ? "Live updates stopped: the key was refused. Enter the read key (WORKER_READ_KEY) or the API key."
          : "Live updates stopped: this worker needs a key to show its data. Enter the read key (WORKER_READ_KEY) or the API key.";
        banner.hidden = false;
        timer = null;
        askKey(banner.textContent);
        return;
      }
      banner.textContent = `Live updates failed: ${e.message} Retrying…`;
      banner.hidden = false;
      wait = 5000;
    }
    timer = document.hidden ? null : setTimeout(run, wait);
  };
  setInterval(() => {
    const age = (Date.now() - last) / 1000;
    live.textContent = `updated ${ui.duration(age, true)} ago`;
    live.classList.toggle("stale", age > wait / 1000 + 15);
  }, 1000);
  document.addEventListener("visibilitychange", () => { if (!document.hidden && !timer) run(); });
  ui.refresh = run;
  run();
};
