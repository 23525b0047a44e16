// The page's only script: it calls the JSON API under it (see /openapi.json) and draws what comes back.
"use strict";

const $ = (id) => document.getElementById(id);

async function api(path, options) {
  const response = await fetch(path, options);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.detail || `${response.status} ${response.statusText}`);
  return body;
}

function showResults(data, what) {
  const grid = $("results");
  grid.replaceChildren();
  $("status").textContent = `${data.results.length} result(s) for ${what}`;
  for (const hit of data.results) {
    const card = document.createElement("div");
    card.className = "card";
    card.dataset.id = hit.id;
    const img = document.createElement("img");
    img.src = `/thumb/${hit.id}`;
    img.alt = hit.path;
    img.title = hit.path;
    img.addEventListener("click", () => openViewer(hit));
    const meta = document.createElement("div");
    meta.className = "meta";
    const score = document.createElement("span");
    score.textContent = hit.score.toFixed(3);
    const more = document.createElement("button");
    more.className = "more";
    more.textContent = "more like this";
    more.addEventListener("click", () => run(api(`/api/similar?id=${hit.id}&k=24`), `image ${hit.path}`));
    // an image term of a weighted query is an indexed image's id: the server never opens a path from the page
    const add = document.createElement("button");
    add.className = "add";
    add.textContent = "+ query";
    add.title = "add this image to the query as a term (then weight it, or subtract it with -)";
    add.addEventListener("click", () => {
      const box = $("query");
      box.value = box.value.trim() ? `${box.value.trim()} + id:${hit.id}` : `id:${hit.id}`;
      box.focus();
    });
    meta.append(score, more, add);
    card.append(img, meta);
    grid.append(card);
  }
}

async function run(request, what) {
  $("status").textContent = "searching...";
  try {
    showResults(await request, what);
  } catch (error) {
    $("results").replaceChildren();
    $("status").textContent = `error: ${error.message}`;
  }
}

function openViewer(hit) {
  $("viewer-image").src = `/image/${hit.id}`;
  $("viewer-path").textContent = hit.path;
  $("viewer").hidden = false;
}

function searchByImage(file) {
  if (!file) return;
  const form = new FormData();
  form.append("file", file);
  run(api("/api/similar", { method: "POST", body: form }), `image ${file.name}`);
}

$("search-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const q = $("query").value.trim();
  if (q) run(api(`/api/search?q=${encodeURIComponent(q)}&k=24`), `"${q}"`);
});
$("query-image").addEventListener("change", (event) => searchByImage(event.target.files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  searchByImage(event.dataTransfer.files[0]);
});
$("viewer-close").addEventListener("click", () => { $("viewer").hidden = true; });

$("classify-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const file = $("classify-image").files[0];
  $("classify-preview").src = URL.createObjectURL(file);
  const bars = $("bars");
  bars.textContent = "classifying...";
  try {
    const data = await api("/api/classify", { method: "POST", body: new FormData(event.target) });
    bars.replaceChildren();
    for (const p of data.predictions) {
      const bar = document.createElement("div");
      bar.className = "bar";
      bar.dataset.label = p.label;
      bar.innerHTML = '<div class="label"></div><div class="track"><div class="fill"></div></div>';
      bar.querySelector(".label").textContent = `${p.label}: ${(100 * p.probability).toFixed(1)}%`;
      bar.querySelector(".fill").style.width = `${100 * p.probability}%`;
      bars.append(bar);
    }
    const note = document.createElement("p");
    note.className = "info";
    note.textContent = data.probabilities === "sigmoid" ? "each label scored on its own (sigmoid)" : "softmax over the labels";
    bars.append(note);
  } catch (error) {
    bars.textContent = `error: ${error.message}`;
  }
});

// the model and the index; while `serve --folder` indexes, the count grows and this says how far it is
async function refreshInfo() {
  try {
    const info = await api("/api/info");
    const running = info.indexing && info.indexing.done < info.indexing.total;
    const indexing = running ? ` · indexing ${info.indexing.done}/${info.indexing.total} new images` : "";
    $("info").textContent =
      `${info.images} images · ${info.embedding_size}-d embeddings · ${info.image_tower} + ${info.text_tower}${indexing}`;
    if (running) setTimeout(refreshInfo, 2000);
  } catch (error) {
    $("info").textContent = `error: ${error.message}`;
  }
}
refreshInfo();
