// The dashboard's own script: live job updates over the job's SSE stream, the event log
// filter, upload progress and toasts. Pages work without it, except for live updates.
"use strict";

function toast(message) {
  const box = document.getElementById("toasts");
  if (!box) return;
  const item = document.createElement("div");
  item.className = "toast";
  item.textContent = message;
  box.appendChild(item);
  setTimeout(() => item.remove(), 4000);
}

function watchJob(section) {
  const id = section.dataset.job;
  if (section.dataset.terminal === "true") return;
  let pending = false;
  let last = 0;
  // Re-render the live region at most once a second, however fast steps arrive.
  const refresh = () => {
    if (pending) return;
    pending = true;
    const wait = Math.max(0, 1000 - (Date.now() - last));
    setTimeout(async () => {
      try {
        const response = await fetch(`/training/job/${id}/live`, { credentials: "same-origin" });
        if (response.ok) section.innerHTML = await response.text();
      } finally {
        last = Date.now();
        pending = false;
      }
    }, wait);
  };
  const events = new EventSource(`/api/v1/jobs/${id}/stream`);
  events.addEventListener("status", (e) => {
    const job = JSON.parse(e.data);
    // The stage chips are part of the live region the refresh redraws.
    refresh();
    if (["completed", "failed", "cancelled", "interrupted"].includes(job.status)) {
      // The job's actions and artifacts change with its end: show them.
      events.close();
      setTimeout(() => window.location.reload(), 500);
    }
  });
  events.addEventListener("metrics", refresh);
  // The job is settled: the server closes the stream, and the browser must not reopen it.
  events.addEventListener("end", () => events.close());
  events.addEventListener("event", (e) => {
    const event = JSON.parse(e.data);
    const list = document.getElementById("events");
    if (!list) return;
    const item = document.createElement("li");
    item.dataset.type = event.event_type;
    item.className = event.severity;
    const time = document.createElement("time");
    time.textContent = event.created_at.slice(11, 19);
    item.append(time, " " + event.message);
    list.prepend(item);
    applyEventFilter();
  });
}

function applyEventFilter() {
  const select = document.getElementById("event-filter");
  if (!select) return;
  document.querySelectorAll("#events li").forEach((li) => {
    li.hidden = select.value !== "" && li.dataset.type !== select.value;
  });
}

function watchUpload(form) {
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    const bar = document.getElementById("upload-progress");
    const request = new XMLHttpRequest();
    request.open("POST", form.action);
    request.upload.onprogress = (p) => {
      if (p.lengthComputable) { bar.hidden = false; bar.value = (100 * p.loaded) / p.total; }
    };
    request.onload = () => {
      // The form answers with a redirect to the new file's page, which XHR follows.
      if (request.status === 200 && request.responseURL.includes("/training/files/")) {
        window.location = request.responseURL;
      } else {
        const title = new DOMParser().parseFromString(request.responseText, "text/html")
          .querySelector("main h1 + p");
        toast(`Upload failed (${request.status})${title ? ": " + title.textContent : ""}`);
        bar.hidden = true;
      }
    };
    request.onerror = () => toast("Upload failed: the server could not be reached");
    request.send(new FormData(form));
  });
}

// Narrows a long <select> to the options whose text contains what is typed.
function watchFilter(input) {
  const select = document.getElementById(input.dataset.filters);
  if (!select) return;
  input.addEventListener("input", () => {
    const wanted = input.value.toLowerCase();
    for (const option of select.options) {
      option.hidden = !option.textContent.toLowerCase().includes(wanted);
    }
  });
}

// The configure form's estimate as it is filled in, from POST /api/v1/jobs/estimate: the
// rule the server applies when it saves the configuration (tokens × epochs ÷ measured or
// modelled throughput), with what it rests on.
function watchEstimate(form) {
  const output = document.getElementById("estimate");
  const basis = document.getElementById("estimate-basis");
  const hours = (h) => (h < 1 ? `${Math.max(1, Math.round(h * 60))} min` : `${h.toFixed(1)} h`);
  const describe = (t) => {
    if (t.source === "measured") return `measured: ${Math.round(t.tokens_per_second)} tokens/s, the median of ${t.samples} completed run${t.samples === 1 ? "" : "s"}`;
    if (t.source === "modelled") return `modelled: ${Math.round(t.tokens_per_second)} tokens/s at an assumed ${Math.round(t.assumed_utilization * 100)}% of ${t.peak_tflops} TFLOP/s`;
    return "from the preset's duration table";
  };
  let timer = null;
  let latest = 0;
  const update = async () => {
    const preset = form.querySelector("input[name=preset_id]:checked");
    const kind = form.querySelector("input[name=gpu_type]:checked");
    const gpu = form.querySelector("#gpu_model").value;
    if (!preset || !kind || !gpu) return;
    const hyperparameters = {};
    for (const name of ["epochs", "learning_rate", "rank", "batch_size"]) {
      const text = form.querySelector(`input[name=${name}]`).value.trim();
      if (text !== "" && !Number.isNaN(Number(text))) hyperparameters[name] = Number(text);
    }
    const request = ++latest;
    const response = await fetch("/api/v1/jobs/estimate", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({
        training_file_id: form.dataset.file, base_model: form.dataset.model,
        preset_id: preset.value, gpu_type: kind.value, gpu_model: gpu, hyperparameters,
      }),
    }).catch(() => null);
    if (request !== latest) return;
    const body = response ? await response.json().catch(() => null) : null;
    if (!response || !response.ok || !body) {
      const fields = body?.error?.fields?.map((f) => `${f.field}: ${f.message}`).join("; ");
      output.textContent = fields || body?.error?.message || "no estimate (the server could not be reached)";
      basis.textContent = "";
      return;
    }
    output.textContent = `$${body.cost_min.toFixed(2)}–$${body.cost_max.toFixed(2)} over ${hours(body.duration_hours_min)}–${hours(body.duration_hours_max)} (${kind.value} at $${body.hourly_rate.toFixed(2)}/h)`;
    const done = (t) => new Date(t).toLocaleString();
    basis.textContent = `${describe(body.throughput)}; ${body.tokens_per_epoch.toLocaleString()} tokens × ${body.epochs} epochs, ${body.token_method}; done between ${done(body.completion_earliest)} and ${done(body.completion_latest)}.`;
  };
  const schedule = () => {
    clearTimeout(timer);
    timer = setTimeout(update, 250);
  };
  form.addEventListener("input", schedule);
  form.addEventListener("change", schedule);
  update();
}

// A validation's progress from the job's stream; the page reloads when it ends.
function watchValidation(card) {
  if (card.dataset.pending !== "true" || !window.EventSource) return;
  const events = new EventSource(`/api/v1/jobs/${card.dataset.job}/stream`);
  const progress = document.getElementById("validation-progress");
  events.addEventListener("validation", (message) => {
    const run = JSON.parse(message.data);
    if (run.status === "completed" || run.status === "failed") {
      events.close();
      window.location.reload();
      return;
    }
    if (progress) {
      const p = run.progress;
      progress.textContent = p ? `${run.status}: ${p.message} (${p.done}/${p.total})` : run.status;
    }
  });
  events.addEventListener("end", () => events.close());
}

document.addEventListener("DOMContentLoaded", () => {
  const scorecard = document.getElementById("scorecard");
  if (scorecard) watchValidation(scorecard);
  const configure = document.getElementById("configure");
  if (configure) watchEstimate(configure);
  document.querySelectorAll("input[data-filters]").forEach(watchFilter);
  const live = document.getElementById("live");
  if (live) watchJob(live);
  const filter = document.getElementById("event-filter");
  if (filter) filter.addEventListener("change", applyEventFilter);
  const upload = document.getElementById("upload");
  if (upload) watchUpload(upload);
  const notice = document.querySelector(".alert.ok[role=status]");
  if (notice) toast(notice.textContent);
});
