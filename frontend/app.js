// The page: pick or drop a query image (and drag a region of it), search, show results; click a result to search by
// it, select several to search with them, mark one "not like this"; filter by metadata; export the results.
const $ = (id) => document.getElementById(id);
let queryFile = null;
let crop = null; // the region of the query image dragged on its preview: "x,y,w,h" in fractions
let lastSearch = null; // { query, fetch(offset), label, nextOffset, shown }: what "More results" continues
const picked = new Set(); // ids of results selected for "Search with these"
let historyNote = null; // why /status says this page may not read the history (then analytics only), or null

function options() {
  return { limit: $("limit").value, useProtos: $("use-prototypes").checked, protoLimit: $("prototype-limit").value,
    minScore: Number($("min-score").value), filters: chosenFilters() };
}

// The metadata filters set on the page: {key, op, value}, the value as text (see api.filterObject).
function chosenFilters() {
  const chosen = [];
  document.querySelectorAll("#filters [data-key]").forEach((control) => {
    if (control.value !== "") chosen.push({ key: control.dataset.key, op: control.dataset.op, value: control.value });
  });
  return chosen;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function setBusy(busy) {
  $("search-button").disabled = busy || !queryFile;
  $("prototypes-button").disabled = busy || !queryFile;
  $("more-button").disabled = busy;
  $("with-these-button").disabled = busy || !picked.size;
  $("export-button").disabled = busy || !lastSearch || !lastSearch.shown;
  document.body.classList.toggle("busy", busy);
}

function chooseFile(file) {
  if (!file) return;
  showError("");
  queryFile = file;
  clearRegion();
  const preview = $("preview");
  preview.src = URL.createObjectURL(file);
  preview.alt = "Query image: " + file.name;
  preview.hidden = false;
  $("drop-hint").textContent = file.name + " — drop or click to change";
  setBusy(false);
  runSearch();
}

function renderCategories(prototypes) {
  const list = $("chosen-categories");
  list.replaceChildren(...prototypes.map((p) => {
    const li = document.createElement("li");
    li.textContent = `${p.category} ${p.similarity.toFixed(3)}`;
    return li;
  }));
}

function resultCard(hit, actions = true) {
  const li = document.createElement("li");
  const button = document.createElement("button");
  button.type = "button";
  button.className = "card";
  button.title = "Search for images like this one";
  button.dataset.imageId = hit.image_id;
  const img = document.createElement("img");
  img.src = hit.image_url;
  img.alt = `Result ${hit.rank}: ${hit.category || "uncategorised"} (${hit.file_name || "image " + hit.image_id})`;
  img.loading = "lazy";
  const caption = document.createElement("span");
  caption.className = "caption";
  const score = typeof hit.score === "number" ? `<span class="score">${hit.score.toFixed(3)}</span> ` : "";
  caption.innerHTML = `<b>#${hit.rank}</b> ${score}<span class="category"></span>`;
  caption.querySelector(".category").textContent = hit.category || "";
  button.append(img, caption);
  button.addEventListener("click", () => searchByImage(hit.image_id));
  li.append(button);
  if (actions) li.append(cardActions(hit.image_id));
  return li;
}

// Under each result: select it for "Search with these", or search again without things like it.
function cardActions(imageId) {
  const bar = document.createElement("div");
  bar.className = "card-actions";
  const label = document.createElement("label");
  const box = document.createElement("input");
  box.type = "checkbox";
  box.className = "pick";
  box.checked = picked.has(imageId);
  box.setAttribute("aria-label", `Select image ${imageId}`);
  box.addEventListener("change", () => {
    if (box.checked) picked.add(imageId); else picked.delete(imageId);
    $("with-these-button").textContent = `Search with these (${picked.size})`;
    $("with-these-button").disabled = !picked.size;
  });
  label.append(box, " select");
  const unlike = document.createElement("button");
  unlike.type = "button";
  unlike.className = "unlike";
  unlike.textContent = "Not like this";
  unlike.title = "Search again, leaving out images like this one";
  unlike.addEventListener("click", () => notLikeThis(imageId));
  bar.append(label, unlike);
  return bar;
}

// A query unlike every category (a cat photo in a collection of clothes) is said to be so, above the results,
// rather than its nearest images being presented as an answer.
function renderConfidence(confidence) {
  const notice = $("no-match");
  notice.hidden = !confidence || confidence.close_match;
  notice.textContent = notice.hidden ? "" : "No close match in this collection: this image is less like any " +
    "category than the collection's own images are. The results below are only the least unlike.";
}

// One page of a search's results: the first replaces what was shown, the next ones are appended.
function render(response, search) {
  if (search !== lastSearch) return; // a newer search started meanwhile
  const total = Object.values(response.timings_ms).reduce((a, b) => a + b, 0);
  const more = response.offset > 0;
  search.shown = (more ? search.shown : 0) + response.results.length;
  search.nextOffset = response.next_offset;
  $("summary").textContent = `${search.label}: ${search.shown} results in ${total.toFixed(0)} ms`;
  if (!more) {
    renderConfidence(response.confidence);
    renderCategories(response.prototypes);
    $("results").replaceChildren();
  }
  $("results").append(...response.results.map((hit) => resultCard(hit)));
  $("more-button").hidden = response.next_offset === null || Boolean(search.query.historyId);
}

// A new search with the options as they are now: its first page now, the next ones through "More results". The query
// is { file, crop, positiveIds, negativeIds }: an uploaded image (or none) and stored examples.
function startSearch(query, label) {
  const chosen = options();
  const search = { query, options: chosen, fetch: (offset, format, limit = chosen.limit) =>
    api.run(query, { ...chosen, limit }, offset, format), label, nextOffset: null, shown: 0 };
  lastSearch = search;
  picked.clear(); // selections belong to the results they were made on
  $("with-these-button").textContent = "Search with these (0)";
  guarded(async () => {
    try {
      render(await search.fetch(0), search);
    } catch (err) {
      if (search === lastSearch) throw err; // a newer search replaced this one: its error no longer matters
    }
  });
}

function showMore() {
  const search = lastSearch;
  if (!search || search.nextOffset === null) return;
  guarded(async () => render(await search.fetch(search.nextOffset), search));
}

// Runs one request's work, showing its error; the page is busy while any request is under way (filters changed in a
// row start several searches, of which only the last is shown).
let underWay = 0;
async function guarded(work) {
  underWay += 1;
  setBusy(true);
  showError("");
  try {
    await work();
  } catch (err) {
    showError(err.message);
  } finally {
    underWay -= 1;
    setBusy(underWay > 0);
  }
}

function runSearch() {
  if (!queryFile) return;
  const label = crop ? "Similar to the region" : "Similar images";
  startSearch({ file: queryFile, crop, positiveIds: [], negativeIds: [] }, label);
}

function runPrototypes() {
  if (!queryFile) return;
  lastSearch = null; // filters and "More results" belong to a search, not to this ranking of categories
  guarded(async () => {
    const response = await api.searchPrototypes(queryFile, options().protoLimit);
    $("summary").textContent = `Closest categories (${response.timings_ms.prototypes.toFixed(1)} ms after embedding)`;
    renderConfidence(response.confidence);
    renderCategories(response.prototypes);
    $("results").replaceChildren();
    $("more-button").hidden = true;
  });
}

function searchByImage(imageId) {
  startSearch({ file: null, positiveIds: [imageId], negativeIds: [] }, `Images like #${imageId}`);
}

function searchWithPicked() {
  if (!picked.size) return;
  const ids = [...picked];
  startSearch({ file: null, positiveIds: ids, negativeIds: [] }, `Images like #${ids.join(", #")}`);
}

// The same search again, with this result as a negative example.
function notLikeThis(imageId) {
  if (!lastSearch) return;
  const query = { ...lastSearch.query, negativeIds: [...lastSearch.query.negativeIds, imageId] };
  startSearch(query, `${lastSearch.label.split(" — ")[0]} — not like #${query.negativeIds.join(", #")}`);
}

// The current search's results as a file: as many as are shown, in the chosen format.
function exportResults() {
  const search = lastSearch;
  if (!search || !search.shown) return;
  const format = $("export-format").value;
  guarded(async () => {
    const blob = await search.fetch(0, format, search.shown); // the search as it was run, as many as are shown
    const link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    link.download = `imsrc-results.${format}`;
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 10000);
  });
}

// Dragging a rectangle on the preview chooses a region of the query image; the search then uses that region.
function startRegion(event) {
  const preview = $("preview");
  if (preview.hidden || event.button !== 0) return;
  event.preventDefault();
  const box = preview.getBoundingClientRect();
  const start = { x: event.clientX - box.left, y: event.clientY - box.top };
  const region = $("region");
  const clamp = (v, max) => Math.min(Math.max(v, 0), max);
  const at = (e) => ({ x: clamp(e.clientX - box.left, box.width), y: clamp(e.clientY - box.top, box.height) });
  const draw = (e) => {
    const end = at(e);
    Object.assign(region.style, { left: `${Math.min(start.x, end.x)}px`, top: `${Math.min(start.y, end.y)}px`,
      width: `${Math.abs(end.x - start.x)}px`, height: `${Math.abs(end.y - start.y)}px` });
    region.hidden = false;
    return end;
  };
  const stop = (e) => {
    window.removeEventListener("pointermove", draw);
    window.removeEventListener("pointerup", stop);
    const end = draw(e);
    const w = Math.abs(end.x - start.x), h = Math.abs(end.y - start.y);
    if (w < 4 || h < 4) { clearRegion(); runSearch(); return; } // a click, not a drag: the whole image again
    const f = (v) => v.toFixed(4);
    crop = [Math.min(start.x, end.x) / box.width, Math.min(start.y, end.y) / box.height, w / box.width,
      h / box.height].map(f).join(",");
    $("region-note").hidden = false;
    runSearch();
  };
  window.addEventListener("pointermove", draw);
  window.addEventListener("pointerup", stop);
}

function clearRegion() {
  crop = null;
  $("region").hidden = true;
  $("region-note").hidden = true;
}

// The filters the collection allows: a choice of values for text and true/false keys with few values, a range for
// number keys, a text box for the others. Changing one searches again.
async function loadFilters() {
  let keys;
  try {
    keys = await api.metadataKeys();
  } catch (err) {
    return; // the page works without filters
  }
  const usable = keys.filter((k) => !k.key.includes(":"));
  $("filters").hidden = !usable.length;
  $("filter-controls").replaceChildren(...usable.map((k) => {
    const row = document.createElement("div");
    row.className = "filter";
    const name = document.createElement("span");
    name.textContent = k.key;
    row.append(name);
    const control = (tag, op, type, label) => {
      const el = document.createElement(tag);
      Object.assign(el.dataset, { key: k.key, op, type });
      el.setAttribute("aria-label", `${k.key} ${label}`);
      el.addEventListener("change", () => lastSearch && startSearch(lastSearch.query, lastSearch.label));
      row.append(el);
      return el;
    };
    if (k.values.length && !k.more_values) {
      const select = control("select", "eq", k.types.includes("boolean") && !k.types.includes("string") ? "boolean"
        : "string", "is");
      select.append(new Option("any", ""), ...k.values.map((v) => new Option(`${v.value} (${v.images})`, v.value)));
    } else if (k.min !== null) {
      for (const [op, label, hint] of [["gte", "from", k.min], ["lte", "to", k.max]]) {
        const input = control("input", op, "number", label);
        Object.assign(input, { type: "number", placeholder: String(hint), step: "any" });
      }
    } else {
      const input = control("input", "eq", "string", "is");
      input.placeholder = "any";
    }
    return row;
  }));
}

// The minimum score: shown as it moves; the search runs again when it is let go.
function showMinScore() {
  const value = Number($("min-score").value);
  $("min-score-value").textContent = value > 0 ? value.toFixed(2) : "off";
}

async function loadStatus() {
  try {
    const s = await api.status();
    const where = api.collection ? `${s.collection}: ` : "";
    // Another model's vectors: a re-embed under way (or done, waiting for the switch), or an old model kept.
    const others = Object.entries(s.embeddings).filter(([model]) => model !== s.model)
      .map(([model, n]) => ` · ${model}: ${n} of ${s.images} vectors${n >= s.images ? " (ready to switch to)" : ""}`);
    $("status").textContent = `${where}${s.index_size} images indexed · ${s.categories} categories · model ${s.model}` +
      others.join("");
    // The history is guarded as writes are; analytics are not: say why the searches will not be listed.
    historyNote = s.history_note;
    $("history-note").textContent = historyNote ? `Analytics only: ${historyNote}` : "";
  } catch (err) {
    $("status").textContent = err.message;
  }
}

async function loadCategories() {
  try {
    const cats = await api.categories();
    $("categories").replaceChildren(...cats.map((c) => {
      const li = document.createElement("li");
      const b = document.createElement("button");
      b.type = "button";
      b.textContent = `${c.name} (${c.image_count})`;
      if (c.automatic) b.title = "a cluster imsrc made: this collection has no labels";
      b.addEventListener("click", async () => {
        try {
          const page = await api.categoryImages(c.category_id);
          $("browse").replaceChildren(...page.images.map((im, i) => resultCard({
            image_id: im.image_id, image_url: im.image_url, rank: i + 1, category: im.category,
            file_name: im.original_name }, false)));
        } catch (err) { showError(err.message); }
      });
      li.append(b);
      return li;
    }));
  } catch (err) {
    showError(err.message);
  }
}

// Near-duplicates: each group side by side, with what to do about it. A decision is stored (the group is not offered
// again); "Keep one" deletes the others, so it asks first.
const NO_DUPLICATES = "No near-duplicates left to review";

async function findDuplicates() {
  guarded(async () => {
    const groups = await api.duplicates();
    const plural = groups.length > 1 ? "s" : "";
    $("duplicates-summary").textContent = groups.length ? `${groups.length} group${plural} of near-duplicates`
      : NO_DUPLICATES;
    $("duplicate-groups").replaceChildren(...groups.map(duplicateGroup));
  });
}

function duplicateGroup(group, n) {
  const li = document.createElement("li");
  li.className = "group";
  const ids = group.images.map((im) => im.image_id);
  const thumbs = document.createElement("div");
  thumbs.className = "thumbs";
  group.images.forEach((im, i) => {
    const figure = document.createElement("label");
    figure.className = "thumb";
    const img = document.createElement("img");
    img.src = im.image_url;
    img.alt = `Image ${im.image_id} (${im.file_name || im.category || ""})`;
    const pick = document.createElement("input");
    Object.assign(pick, { type: "radio", name: `keep-${n}`, value: im.image_id, checked: i === 0 });
    const caption = document.createElement("span");
    caption.textContent = `#${im.image_id} · ${im.score.toFixed(3)}`;
    figure.append(img, pick, caption);
    thumbs.append(figure);
  });
  const actions = document.createElement("div");
  actions.className = "buttons";
  const act = (label, decision) => {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = label;
    button.dataset.decision = decision;
    button.addEventListener("click", () => guarded(async () => {
      const keep = Number(li.querySelector("input:checked").value);
      const question = `Delete ${ids.length - 1} of these images, keeping #${keep}?`;
      if (decision === "keep_one" && !window.confirm(question)) return;
      await api.decideDuplicates(ids, decision, keep);
      li.remove();
      if (!$("duplicate-groups").children.length) $("duplicates-summary").textContent = NO_DUPLICATES;
    }));
    actions.append(button);
  };
  act("Keep the chosen one", "keep_one");
  act("Keep all", "keep_all");
  act("Not duplicates", "not_duplicates");
  li.append(thumbs, actions);
  return li;
}

// History: the searches this service answered, newest first, each with its query and "Run again"; analytics: searches
// per day (a bar chart), latency percentiles, the categories most searched and the images most returned.
async function loadHistory() {
  guarded(async () => {
    const [page, stats] = await Promise.all([historyNote ? null : api.history(), api.analytics()]);
    $("history-summary").textContent = page ? `${page.total} searches recorded` : "";
    $("history").replaceChildren(...(page ? page.entries.map(historyEntry) : []));
    renderAnalytics(stats);
  });
}

function historyEntry(entry) {
  const li = document.createElement("li");
  li.className = "history-entry";
  if (entry.thumbnail_url) {
    const img = document.createElement("img");
    img.src = entry.thumbnail_url;
    img.alt = `Query of search ${entry.id}`;
    li.append(img);
  }
  const text = document.createElement("span");
  const when = new Date(entry.at).toLocaleString();
  text.textContent = `${when} · ${entry.kind} · ${entry.result_ids.length} results · ${entry.total_ms.toFixed(0)} ms`;
  const again = document.createElement("button");
  again.type = "button";
  again.textContent = "Run again";
  again.addEventListener("click", () => startSearch({ historyId: entry.id, positiveIds: [], negativeIds: [] },
    `Search ${entry.id} again`));
  li.append(text, again);
  return li;
}

function renderAnalytics(stats) {
  const most = Math.max(1, ...stats.per_day.map((d) => d.searches));
  const width = 24;
  const svg = [`<svg viewBox="0 0 ${Math.max(1, stats.per_day.length) * width} 110" role="img"`,
    ` aria-label="Searches per day" class="chart">`];
  stats.per_day.forEach((d, i) => {
    const h = Math.round((d.searches / most) * 90);
    svg.push(`<rect x="${i * width + 3}" y="${95 - h}" width="${width - 6}" height="${h}"><title>${d.day}: ` +
      `${d.searches}</title></rect><text x="${i * width + width / 2}" y="108">${d.day.slice(5)}</text>`);
  });
  svg.push("</svg>");
  $("chart").innerHTML = svg.join("");
  const l = stats.latency_ms;
  $("latency").textContent = l.p50 === null ? "No searches yet" :
    `${stats.searches} searches in ${stats.days} days · latency p50 ${l.p50} ms, p95 ${l.p95} ms, p99 ${l.p99} ms`;
  $("top-categories").replaceChildren(...stats.top_categories.map((c) => {
    const li = document.createElement("li");
    li.textContent = `${c.category} (${c.searches})`;
    return li;
  }));
  $("top-images").replaceChildren(...stats.top_images.map((im) => {
    const li = document.createElement("li");
    const img = document.createElement("img");
    img.src = api.imageSrc(im.image_id);
    img.alt = `Image ${im.image_id}, returned ${im.times_returned} times`;
    li.append(img, `×${im.times_returned}`);
    return li;
  }));
}

const zone = $("drop-zone");
["dragenter", "dragover"].forEach((t) => zone.addEventListener(t, (e) => { e.preventDefault(); zone.classList.add("over"); }));
["dragleave", "drop"].forEach((t) => zone.addEventListener(t, () => zone.classList.remove("over")));
zone.addEventListener("drop", (e) => { e.preventDefault(); chooseFile(e.dataTransfer.files[0]); });
zone.addEventListener("keydown", (e) => {
  if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("file-input").click(); }
});
$("file-input").addEventListener("change", (e) => chooseFile(e.target.files[0]));
$("search-button").addEventListener("click", runSearch);
$("prototypes-button").addEventListener("click", runPrototypes);
$("more-button").addEventListener("click", showMore);
$("min-score").addEventListener("input", showMinScore);
$("min-score").addEventListener("change", () => lastSearch && startSearch(lastSearch.query, lastSearch.label));
$("with-these-button").addEventListener("click", searchWithPicked);
$("find-duplicates").addEventListener("click", findDuplicates);
$("load-history").addEventListener("click", loadHistory);
$("export-button").addEventListener("click", exportResults);
$("preview").addEventListener("pointerdown", startRegion);
$("clear-region").addEventListener("click", () => { clearRegion(); runSearch(); });
// A drop outside the zone would otherwise navigate away to the image.
window.addEventListener("dragover", (e) => e.preventDefault());
window.addEventListener("drop", (e) => e.preventDefault());

// Collections: the switcher lists them; switching clears what the page shows of the last one and loads the new one's
// status, categories and filters. The choice is kept in the address (?collection=), so a reload or a link keeps it.
async function loadCollections() {
  try {
    const listed = await api.collections();
    const wanted = new URLSearchParams(location.search).get("collection");
    api.collection = listed.some((c) => c.name === wanted) ? wanted : null;
    $("collection").replaceChildren(...listed.map((c) => {
      const option = new Option(c.model ? `${c.name} (${c.model})` : c.name, c.name);
      option.selected = c.name === (api.collection || listed[0].name);
      return option;
    }));
    $("collection-switcher").hidden = listed.length < 2;
  } catch (err) {
    showError(err.message);
  }
}

function switchCollection() {
  api.collection = $("collection").value;
  const address = new URL(location.href);
  address.searchParams.set("collection", api.collection);
  history.replaceState(null, "", address);
  lastSearch = null;
  picked.clear();
  showError("");
  for (const id of ["results", "browse", "chosen-categories", "history", "duplicate-groups", "top-categories",
    "top-images", "chart"]) $(id).replaceChildren();
  for (const id of ["summary", "history-summary", "duplicates-summary", "latency"]) $(id).textContent = "";
  $("no-match").hidden = true;
  $("more-button").hidden = true;
  setBusy(false);
  loadStatus();
  loadCategories();
  loadFilters();
  if (queryFile) runSearch(); // the same query, in the collection switched to
}

$("collection").addEventListener("change", switchCollection);
loadCollections().then(() => {
  loadStatus();
  loadCategories();
  loadFilters();
});
