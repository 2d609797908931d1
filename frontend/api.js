// Every network call of the page, in one place. Errors become Error objects carrying the API's message.
const api = {
  async request(path, options = {}) {
    let response;
    try {
      response = await fetch(path, options);
    } catch (err) {
      throw new Error("Cannot reach the imsrc server: " + err.message);
    }
    const body = response.headers.get("content-type")?.includes("json") ? await response.json() : null;
    if (!response.ok) {
      throw new Error((body && body.detail) || `The server answered ${response.status}`);
    }
    return body;
  },
  status() { return this.request("/status"); },
  categories() { return this.request("/categories"); },
  categoryImages(id, limit = 24) { return this.request(`/categories/${id}/images?limit=${limit}`); },
  // The query string of a search: a page (offset) of results, down to a minimum score when one is set.
  searchParams({ limit, useProtos, protoLimit, minScore }, offset) {
    const q = new URLSearchParams({ limit, use_prototypes: useProtos, prototype_limit: protoLimit, offset });
    if (minScore > 0) q.set("min_score", minScore);
    return q;
  },
  search(file, options, offset = 0) {
    const form = new FormData();
    form.append("file", file);
    return this.request(`/search?${this.searchParams(options, offset)}`, { method: "POST", body: form });
  },
  searchPrototypes(file, protoLimit) {
    const form = new FormData();
    form.append("file", file);
    return this.request(`/search/prototypes?prototype_limit=${protoLimit}`, { method: "POST", body: form });
  },
  similar(imageId, options, offset = 0) {
    return this.request(`/images/${imageId}/similar?${this.searchParams(options, offset)}`);
  },
};
