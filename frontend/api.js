// Every network call of the page, in one place. Errors become Error objects carrying the API's message.
const api = {
  collection: null, // the collection the page works on (the switcher); null: the server's own
  // A path of the API in the page's collection: every request, and every image id, is the collection's own.
  inCollection(path) {
    if (!this.collection) return path;
    const url = new URL(path, location.origin);
    url.searchParams.set("collection", this.collection);
    return url.pathname + url.search;
  },
  async request(path, options = {}) {
    let response;
    try {
      response = await fetch(this.inCollection(path), options);
    } catch (err) {
      throw new Error("Cannot reach the imsrc server: " + err.message);
    }
    const json = response.headers.get("content-type")?.includes("json");
    if (!response.ok) {
      const body = json ? await response.json() : null;
      throw new Error((body && body.detail) || `The server answered ${response.status}`);
    }
    return options.asFile ? response.blob() : json ? response.json() : null;
  },
  status() { return this.request("/status"); },
  collections() { return this.request("/collections"); },
  imageSrc(imageId) { return this.inCollection(`/images/${imageId}`); },
  categories() { return this.request("/categories"); },
  metadataKeys() { return this.request("/metadata/keys"); },
  categoryImages(id, limit = 24) { return this.request(`/categories/${id}/images?limit=${limit}`); },
  // The query string of a search: a page (offset) of results, down to a minimum score when one is set, among the
  // images whose metadata match the filter terms.
  searchParams({ limit, useProtos, protoLimit, minScore, filters }, offset) {
    const q = new URLSearchParams({ limit, use_prototypes: useProtos, prototype_limit: protoLimit, offset });
    if (minScore > 0) q.set("min_score", minScore);
    filters.forEach(({ key, op, value }) => q.append("filter", `${key}:${op}:${value}`));
    return q;
  },
  // One page of a search, or (with format) the search as a file: by an uploaded image (with stored examples beside
  // it and a region of it), by one stored image, or by several stored images.
  run(query, options, offset = 0, format = null) {
    const q = this.searchParams(options, offset);
    if (format) { q.set("format", format); q.delete("offset"); }
    const suffix = format ? "/export" : "";
    const asFile = Boolean(format);
    if (query.historyId) {
      if (offset || format) throw new Error("A search run again from the history shows its own results only");
      return this.request(`/history/${query.historyId}/run`, { method: "POST" });
    }
    if (query.file) {
      const form = new FormData();
      form.append("file", query.file);
      query.positiveIds.forEach((id) => q.append("positive_id", id));
      query.negativeIds.forEach((id) => q.append("negative_id", id));
      if (query.crop) q.set("crop", query.crop);
      return this.request(`/search${suffix}?${q}`, { method: "POST", body: form, asFile });
    }
    if (query.positiveIds.length === 1 && !query.negativeIds.length) {
      return this.request(`/images/${query.positiveIds[0]}/similar${suffix}?${q}`, { asFile });
    }
    const body = { positive_ids: query.positiveIds, negative_ids: query.negativeIds, limit: Number(options.limit),
      use_prototypes: options.useProtos, prototype_limit: Number(options.protoLimit),
      filter: this.filterObject(options.filters) };
    if (!format) body.offset = offset;
    if (options.minScore > 0) body.min_score = options.minScore;
    const path = `/search/examples${suffix}` + (format ? `?format=${format}` : "");
    return this.request(path, { method: "POST", body: JSON.stringify(body), asFile,
      headers: { "content-type": "application/json" } });
  },
  // The page's filters ({key, op, value as text}) in the JSON form, meaning what the query-string form means: a
  // value equals its text, or the number or true/false the text reads as.
  filterObject(filters) {
    const spec = {};
    filters.forEach(({ key, op, value }) => {
      const alternatives = [value];
      if (/^[+-]?(0|[1-9][0-9]*)(\.[0-9]+)?$/.test(value)) alternatives.push(Number(value));
      if (value === "true" || value === "false") alternatives.push(value === "true");
      spec[key] = { ...spec[key], ...(op === "eq" ? { in: alternatives } : { [op]: Number(value) }) };
    });
    return filters.length ? spec : null;
  },
  duplicates() { return this.request("/duplicates"); },
  history() { return this.request("/history?limit=20"); },
  analytics() { return this.request("/analytics?days=30"); },
  decideDuplicates(imageIds, decision, keep = null) {
    return this.request("/duplicates/decisions", { method: "POST", headers: { "content-type": "application/json" },
      body: JSON.stringify({ image_ids: imageIds, decision, keep }) });
  },
  searchPrototypes(file, protoLimit) {
    const form = new FormData();
    form.append("file", file);
    return this.request(`/search/prototypes?prototype_limit=${protoLimit}`, { method: "POST", body: form });
  },
};
