// The page: pick or drop a query image, search, show results; click a result to search by it.
const $ = (id) => document.getElementById(id);
let queryFile = null;
let lastSearch = null; // { run, fetch(offset), label, nextOffset, shown }: what "More results" continues

function options() {
  return { limit: $("limit").value, useProtos: $("use-prototypes").checked, protoLimit: $("prototype-limit").value,
    minScore: Number($("min-score").value) };
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function setBusy(busy) {
  $("search-button").disabled = busy || !queryFile;
  $("prototypes-button").disabled = busy || !queryFile;
  $("more-button").disabled = busy;
  document.body.classList.toggle("busy", busy);
}

function chooseFile(file) {
  if (!file) return;
  showError("");
  queryFile = file;
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

function resultCard(hit) {
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
  return li;
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
  $("results").append(...response.results.map(resultCard));
  $("more-button").hidden = response.next_offset === null;
}

// A new search (file or stored image) with the options as they are now: its first page now, the next ones through
// "More results". run(options, offset) fetches one page.
function startSearch(run, label) {
  const chosen = options();
  const search = { run, fetch: (offset) => run(chosen, offset), label, nextOffset: null, shown: 0 };
  lastSearch = search;
  guarded(async () => render(await search.fetch(0), search));
}

function showMore() {
  const search = lastSearch;
  if (!search || search.nextOffset === null) return;
  guarded(async () => render(await search.fetch(search.nextOffset), search));
}

async function guarded(work) {
  setBusy(true);
  showError("");
  try {
    await work();
  } catch (err) {
    showError(err.message);
  } finally {
    setBusy(false);
  }
}

function runSearch() {
  if (!queryFile) return;
  const file = queryFile;
  startSearch((chosen, offset) => api.search(file, chosen, offset), "Similar images");
}

function runPrototypes() {
  if (!queryFile) return;
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
  startSearch((chosen, offset) => api.similar(imageId, chosen, offset), `Images like #${imageId}`);
}

// The minimum score: shown as it moves; the search runs again when it is let go.
function showMinScore() {
  const value = Number($("min-score").value);
  $("min-score-value").textContent = value > 0 ? value.toFixed(2) : "off";
}

async function loadStatus() {
  try {
    const s = await api.status();
    $("status").textContent = `${s.index_size} images indexed · ${s.categories} categories · model ${s.model}`;
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
            file_name: im.original_name })));
        } catch (err) { showError(err.message); }
      });
      li.append(b);
      return li;
    }));
  } catch (err) {
    showError(err.message);
  }
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
$("min-score").addEventListener("change", () => lastSearch && startSearch(lastSearch.run, lastSearch.label));
// A drop outside the zone would otherwise navigate away to the image.
window.addEventListener("dragover", (e) => e.preventDefault());
window.addEventListener("drop", (e) => e.preventDefault());

loadStatus();
loadCategories();
