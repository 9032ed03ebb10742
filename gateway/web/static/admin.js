// The Cloud Storage settings page: sign-in, storages per project, Add Source / Target Storage.
// Talks to the management API with the HttpOnly session cookie; every write carries the
// session's CSRF value in X-CSRF-Token (gateway/api/auth.py).

const SOURCE = "/api/storages/gcs";
const TARGET = "/api/storages/export/gcs";
const RUNNING = new Set(["queued", "in_progress"]);
const POLL_MS = 500;

const $ = (selector, root = document) => root.querySelector(selector);
const $$ = (selector, root = document) => [...root.querySelectorAll(selector)];

let session = null; // {sub, expires_at, csrf}
let targetsAvailable = true;
const state = { sources: [], targets: [], project: null };

class ApiError extends Error {
  constructor(status, body) {
    super(body?.message || `the gateway answered ${status}`);
    this.status = status;
    this.body = body || {};
  }
}

async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  if (method !== "GET" && session) headers["X-CSRF-Token"] = session.csrf;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method,
    headers,
    credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!response.ok) {
    if (response.status === 401 && path !== "/ui/session") showSignIn("Your session has ended; sign in again.");
    throw new ApiError(response.status, data);
  }
  return data;
}

// -- sign-in ------------------------------------------------------------------------------

function showSignIn(message = "") {
  session = null;
  $("#who").hidden = true;
  $("#storages").hidden = true;
  $("#sign-in").hidden = false;
  $("#sign-in-token-error").textContent = message;
  $("#sign-in-token").focus();
}

async function signedIn(answer) {
  session = answer;
  $("#who-name").textContent = answer.sub;
  $("#who").hidden = false;
  $("#sign-in").hidden = true;
  $("#storages").hidden = false;
  await refresh();
}

$("#sign-in-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const field = $("#sign-in-token");
  try {
    const answer = await api("POST", "/ui/session", { token: field.value });
    field.value = "";
    await signedIn(answer);
  } catch (error) {
    const reasons = {
      not_admin: "This token is valid but not an admin token: mint one with gateway token --admin.",
      expired_token: "This token has expired: mint a new one.",
      invalid_token: "This is not a token this gateway accepts (check that it was copied whole).",
    };
    $("#sign-in-token-error").textContent = reasons[error.body?.error] || error.message;
    field.setAttribute("aria-invalid", "true");
  }
});

$("#sign-out").addEventListener("click", async () => {
  await api("DELETE", "/ui/session").catch(() => {});
  showSignIn("Signed out.");
});

// -- storage lists -----------------------------------------------------------------------

async function refresh() {
  $("#page-error").textContent = "";
  const [sources, targets] = await Promise.all([
    api("GET", SOURCE),
    api("GET", TARGET).catch((error) => {
      if (error.status === 404 || error.status === 405) {
        targetsAvailable = false;
        return [];
      }
      throw error;
    }),
  ]).catch((error) => {
    $("#page-error").textContent = `The storages could not be loaded: ${error.message}`;
    return [state.sources, state.targets];
  });
  state.sources = sources;
  state.targets = targets;
  const projects = [...new Set([...sources, ...targets].map((s) => String(s.project)))].sort((a, b) =>
    a.localeCompare(b, undefined, { numeric: true }),
  );
  if (state.project === null || !projects.includes(state.project)) state.project = projects[0] ?? null;
  const select = $("#project");
  select.replaceChildren(
    ...(projects.length ? projects : [""]).map((p) => new Option(p ? `Project ${p}` : "no project yet", p)),
  );
  select.value = state.project ?? "";
  render();
}

$("#project").addEventListener("change", (event) => {
  state.project = event.target.value;
  render();
});

function render() {
  renderTable("source", state.sources.filter((s) => String(s.project) === state.project));
  renderTable("target", state.targets.filter((s) => String(s.project) === state.project));
  if (!targetsAvailable) $("#target-empty").textContent = "Target storages are not available on this gateway.";
  $("#add-target").disabled = !targetsAvailable;
  showTaskCount();
}

async function showTaskCount() {
  const out = $("#task-count");
  if (!state.project) {
    out.textContent = "";
    return;
  }
  try {
    const page = await api("GET", `/api/projects/${encodeURIComponent(state.project)}/tasks?page_size=1`);
    out.textContent = `${page.total} task${page.total === 1 ? "" : "s"} in this project`;
  } catch {
    out.textContent = "";
  }
}

function when(iso) {
  return iso ? new Date(iso).toLocaleString() : "never";
}

function counters(kind, s) {
  const m = s.meta || {};
  if (kind === "source") {
    return `${m.created ?? 0} created · ${m.updated ?? 0} updated · ${m.removed ?? 0} removed · ${m.errors ?? 0} errors`;
  }
  return `${m.delivered ?? 0} delivered · ${m.pending ?? 0} pending · ${m.failing ?? 0} failing`;
}

function cell(row, content) {
  const td = row.insertCell();
  if (content instanceof Node) td.append(content);
  else td.textContent = content;
  return td;
}

function button(label, onClick, { name, ...extra } = {}) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  if (name) b.setAttribute("aria-label", name);
  Object.assign(b, extra);
  b.addEventListener("click", onClick);
  return b;
}

function renderTable(kind, storages) {
  const body = $(`#${kind}-table tbody`);
  body.replaceChildren();
  $(`#${kind}-empty`).hidden = storages.length > 0;
  $(`#${kind}-table`).hidden = storages.length === 0;
  for (const s of storages) {
    const row = body.insertRow();
    row.dataset.id = s.id;
    cell(row, s.title || `(untitled ${s.id})`);
    cell(row, "GCS");
    cell(row, `gs://${s.bucket}/${s.prefix || ""}`);
    cell(row, kind === "target" ? "writes annotations" : s.presign ? `pre-signed URLs (${s.presign_ttl} min)` : "proxied");
    cell(row, when(s.last_sync));
    const status = cell(row, "");
    status.className = "status";
    status.dataset.status = s.status;
    const label = document.createElement("span");
    label.textContent = s.status.replaceAll("_", " ");
    status.append(label);
    if (RUNNING.has(s.status)) {
      const bar = document.createElement("progress");
      bar.setAttribute("aria-label", `sync of ${s.title || s.bucket} running`);
      status.append(" ", bar);
    }
    if (s.problem) status.append(Object.assign(document.createElement("p"), { className: "error", textContent: s.problem }));
    const lastError = s.meta?.last_error || s.meta?.errors_sample?.[0];
    if (lastError && s.status !== "completed") status.append(Object.assign(document.createElement("p"), { className: "error", textContent: String(lastError) }));
    cell(row, counters(kind, s) + (kind === "source" && s.last_sync_count != null ? ` (last sync: ${s.last_sync_count} new)` : ""));
    const actions = cell(row, "");
    actions.className = "row-actions";
    const named = s.title || s.bucket;
    actions.append(button("Sync", () => sync(kind, s), { name: `Sync ${named}`, disabled: RUNNING.has(s.status) }));
    const fromConfig = s.source === "config";
    const why = fromConfig ? "declared in the config file: change it there" : "";
    actions.append(button("Edit", () => openDialog(kind, s), { name: `Edit ${named}`, disabled: fromConfig, title: why }));
    actions.append(button("Delete", () => remove(kind, s), { name: `Delete ${named}`, disabled: fromConfig, title: why }));
    if (RUNNING.has(s.status)) poll(kind, s.id);
  }
}

const polling = new Set();

async function poll(kind, id) {
  const key = `${kind}:${id}`;
  if (polling.has(key)) return;
  polling.add(key);
  const base = kind === "source" ? SOURCE : TARGET;
  try {
    for (;;) {
      await new Promise((resolve) => setTimeout(resolve, POLL_MS));
      const s = await api("GET", `${base}/${id}`);
      replace(kind, s);
      if (!RUNNING.has(s.status)) break;
    }
  } catch (error) {
    $("#page-error").textContent = `Watching the sync failed: ${error.message}`;
  } finally {
    polling.delete(key);
    render();
  }
}

function replace(kind, storage) {
  const list = kind === "source" ? state.sources : state.targets;
  const index = list.findIndex((s) => s.id === storage.id);
  if (index >= 0) list[index] = storage;
  else list.push(storage);
}

async function sync(kind, s) {
  try {
    replace(kind, await api("POST", `${kind === "source" ? SOURCE : TARGET}/${s.id}/sync`));
    render();
  } catch (error) {
    $("#page-error").textContent = `Sync of ${s.title || s.bucket} failed: ${error.message}`;
  }
}

async function remove(kind, s) {
  const what = kind === "source" ? "source storage" : "target storage";
  const extra = kind === "source" ? " Its imported tasks are removed too." : " Annotations already written stay in the bucket.";
  if (!confirm(`Delete the ${what} “${s.title || s.bucket}”?${extra}`)) return;
  try {
    await api("DELETE", `${kind === "source" ? SOURCE : TARGET}/${s.id}`);
    await refresh();
  } catch (error) {
    $("#page-error").textContent = `Delete failed: ${error.message}`;
  }
}

$("#add-source").addEventListener("click", () => openDialog("source", null));
$("#add-target").addEventListener("click", () => openDialog("target", null));

// -- the Add / Edit dialogs ----------------------------------------------------------------

const dialogs = {
  source: { dialog: $("#source-dialog"), form: $("#source-form"), base: SOURCE, noun: "Source Storage", step: 1, editing: null, credentials: undefined },
  target: { dialog: $("#target-dialog"), form: $("#target-form"), base: TARGET, noun: "Target Storage", step: 1, editing: null, credentials: undefined },
};

function openDialog(kind, storage) {
  const d = dialogs[kind];
  d.editing = storage;
  d.credentials = undefined;
  d.form.reset();
  clearErrors(d);
  $$("[data-result]", d.form).forEach((el) => el.replaceChildren());
  $(`#${kind}-title`).textContent = `${storage ? "Edit" : "Add"} ${d.noun}`;
  $$(".when-editing", d.form).forEach((el) => (el.hidden = !storage));
  const values = storage || { project: state.project ?? "" };
  for (const input of $$("input[name]", d.form)) {
    const value = values[input.name];
    if (input.type === "file" || value === undefined || value === null) continue;
    if (input.type === "checkbox") input.checked = Boolean(value);
    else if (input.type === "radio") input.checked = input.value === String(value);
    else input.value = value;
  }
  $(`[name=project]`, d.form).readOnly = Boolean(storage); // storages never move between projects
  go(d, 1);
  d.dialog.showModal();
  $("input:not([readonly])", d.form).focus();
}

for (const [kind, d] of Object.entries(dialogs)) {
  d.form.addEventListener("submit", (event) => event.preventDefault());
  $("input[type=file]", d.form).addEventListener("change", async (event) => {
    const [file] = event.target.files;
    d.credentials = file ? await readText(file) : undefined;
  });
  d.form.addEventListener("click", async (event) => {
    const action = event.target.closest("button[data-action]")?.dataset.action;
    if (!action) return;
    const handlers = {
      cancel: () => d.dialog.close(),
      back: () => go(d, d.step - 1),
      next: () => go(d, d.step + 1),
      test: () => testConnection(d),
      preview: () => loadPreview(d),
      save: () => save(kind, d, false),
      "save-sync": () => save(kind, d, true),
    };
    const b = event.target.closest("button");
    b.disabled = true;
    try {
      await handlers[action]();
    } finally {
      b.disabled = false;
    }
  });
}

function readText(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsText(file);
  });
}

function go(d, step) {
  const steps = $$("fieldset[data-step]", d.form);
  if (!steps.length) return;
  d.step = Math.max(1, Math.min(steps.length, step));
  steps.forEach((fs) => (fs.hidden = Number(fs.dataset.step) !== d.step));
  $$(".steps li", d.form).forEach((li) => {
    if (Number(li.dataset.step) === d.step) li.setAttribute("aria-current", "step");
    else li.removeAttribute("aria-current");
  });
  const last = d.step === steps.length;
  $("[data-action=back]", d.form).hidden = d.step === 1;
  $("[data-action=next]", d.form).hidden = last;
  $("[data-action=save]", d.form).hidden = !last;
  $("[data-action=save-sync]", d.form).hidden = !last;
  if (last) review(d);
}

function fields(d) {
  const values = {};
  for (const input of $$("input[name]", d.form)) {
    if (input.type === "file") continue;
    if (input.type === "checkbox") values[input.name] = input.checked;
    else if (input.type === "radio") {
      if (input.checked) values[input.name] = input.value === "true";
    } else if (input.type === "number") values[input.name] = input.value === "" ? undefined : Number(input.value);
    else values[input.name] = input.value.trim();
  }
  if (values.google_project_id === "") values.google_project_id = null;
  if (d.credentials !== undefined) values.google_application_credentials = d.credentials;
  if (d.editing) delete values.project;
  return values;
}

function clearErrors(d) {
  $$(".field .error, [data-field-error]", d.form).forEach((el) => (el.textContent = ""));
  $$("[aria-invalid]", d.form).forEach((el) => el.removeAttribute("aria-invalid"));
}

const REASONS = {
  bad_credentials: "Wrong credentials",
  permission_denied: "Permission missing",
  bucket_not_found: "Bucket not found",
  cannot_sign: "Cannot sign URLs",
};

// Every message goes next to the field it names; the step holding the first one is shown.
function showErrors(d, error) {
  clearErrors(d);
  const named = error.body?.validation_errors || {};
  let first = null;
  for (const [name, messages] of Object.entries(named)) {
    const field = $(`[data-field="${CSS.escape(name)}"]`, d.form);
    const reason = REASONS[error.body?.error] || (name === "google_application_credentials" ? "Wrong credentials" : "");
    const text = (reason ? `${reason}: ` : "") + messages.join(" ");
    if (!field) {
      $("[data-field-error=general]", d.form).textContent += `${name}: ${text} `;
      continue;
    }
    $(".error", field).textContent = text;
    $$("input", field).forEach((input) => input.setAttribute("aria-invalid", "true"));
    first ??= field;
  }
  if (!Object.keys(named).length) $("[data-field-error=general]", d.form).textContent = error.message;
  if (first) {
    const step = first.closest("fieldset[data-step]");
    if (step) go(d, Number(step.dataset.step));
    $("input", first)?.focus();
  }
}

function withId(d, values) {
  return d.editing ? { ...values, id: d.editing.id } : values;
}

async function testConnection(d) {
  const out = $("[data-result=test]", d.form);
  out.textContent = "Testing…";
  clearErrors(d);
  try {
    const answer = await api("POST", `${d.base}/validate`, withId(d, fields(d)));
    out.textContent = `✓ ${answer.message}`;
    out.dataset.ok = "true";
  } catch (error) {
    out.textContent = "Connection failed (see the message next to the field).";
    out.dataset.ok = "false";
    showErrors(d, error);
  }
}

async function loadPreview(d) {
  const out = $("[data-result=preview]", d.form);
  const list = $("[data-result=preview-list]", d.form);
  out.textContent = "Loading…";
  list.replaceChildren();
  clearErrors(d);
  try {
    const answer = await api("POST", `${d.base}/preview`, { ...withId(d, fields(d)), limit: 20 });
    out.textContent = answer.keys.length
      ? `First ${answer.keys.length} matching object${answer.keys.length === 1 ? "" : "s"}, ${answer.tasks.length} task${answer.tasks.length === 1 ? "" : "s"}:`
      : "No object matches these settings.";
    const ul = document.createElement("ul");
    for (const key of answer.keys) ul.append(Object.assign(document.createElement("li"), { textContent: key }));
    list.append(ul);
    if (answer.tasks.length) {
      const pre = document.createElement("pre");
      pre.textContent = JSON.stringify(answer.tasks.slice(0, 3), null, 2);
      list.append(pre);
    }
    for (const problem of answer.errors) list.append(Object.assign(document.createElement("p"), { className: "error", textContent: problem }));
  } catch (error) {
    out.textContent = "Preview failed (see the message next to the field).";
    showErrors(d, error);
  }
}

function review(d) {
  const dl = $(".review", d.form);
  if (!dl) return;
  const v = fields(d);
  const rows = [
    ["Project", d.editing ? d.editing.project : v.project],
    ["Title", v.title || "(none)"],
    ["Bucket", `gs://${v.bucket}/${v.prefix || ""}`],
    ["Credentials", v.google_application_credentials !== undefined ? "a new key file" : d.editing?.has_credentials ? "the stored key" : "Application Default Credentials"],
    ["Media URLs", v.presign ? `pre-signed, expire after ${v.presign_ttl} minutes` : "proxied through the gateway"],
    ["Import", v.use_blob_urls ? "each file becomes a task" : "task files (JSON, JSONL, Parquet)"],
    ["Filter", v.regex_filter || "every object"],
    ["Sub-folders", v.recursive_scan ? "scanned" : "not scanned"],
  ];
  dl.replaceChildren(...rows.flatMap(([k, val]) => [Object.assign(document.createElement("dt"), { textContent: k }), Object.assign(document.createElement("dd"), { textContent: val })]));
}

async function save(kind, d, andSync) {
  clearErrors(d);
  try {
    const values = fields(d);
    const saved = d.editing
      ? await api("PATCH", `${d.base}/${d.editing.id}`, values)
      : await api("POST", d.base, values);
    d.dialog.close();
    state.project = String(saved.project);
    replace(kind, saved);
    if (andSync) replace(kind, await api("POST", `${d.base}/${saved.id}/sync`));
    await refresh();
  } catch (error) {
    showErrors(d, error);
  }
}

// -- start ------------------------------------------------------------------------------------

api("GET", "/ui/session").then(signedIn, () => showSignIn());
