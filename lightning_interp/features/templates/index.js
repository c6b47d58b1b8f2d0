// The latent index: rows come from the JSON block in index.html (no fetch(): pages are
// opened from file://). Every string is set with textContent, never parsed as HTML.
(function () {
  "use strict";
  var COLUMNS = ["id", "count", "density", "max", "mean", "score", "tokens", "explanation"];
  var PAGE = 200;
  var raw = JSON.parse(document.getElementById("latent-data").textContent).rows;
  var rows = raw.map(function (r) {
    var row = {};
    COLUMNS.forEach(function (name, i) { row[name] = r[i]; });
    row.haystack = (row.tokens.map(function (t) { return t.trim(); }).join("\u0001") + "\u0001" +
      (row.explanation || "")).toLowerCase();
    return row;
  });
  var table = document.getElementById("latents");
  var hasScores = !!table.querySelector("[data-sort=score]");
  var body = table.querySelector("tbody");
  var search = document.getElementById("search");
  var hideDead = document.getElementById("hide-dead");
  var status = document.getElementById("status");
  var state = { key: "id", dir: 1, page: 0, shown: rows };

  function fmt(x) {
    if (x === null || x === undefined) return "-";
    if (x === 0) return "0";
    return Math.abs(x) >= 1e-3 && Math.abs(x) < 1e4 ? String(+x.toPrecision(3)) : x.toExponential(2);
  }
  function cell(tr, text, cls) {
    var td = document.createElement("td");
    if (cls) td.className = cls;
    td.textContent = text;
    tr.appendChild(td);
    return td;
  }
  function filter() {
    var q = search.value.trim().toLowerCase();
    var id = /^#?\d+$/.test(q) ? parseInt(q.replace("#", ""), 10) : null;
    state.shown = rows.filter(function (r) {
      if (hideDead.checked && r.count === 0) return false;
      if (!q) return true;
      return r.id === id || r.haystack.indexOf(q) !== -1;
    });
    sort();
  }
  function sort() {
    var key = state.key, dir = state.dir;
    state.shown.sort(function (a, b) {
      var x = a[key], y = b[key];
      if (x === y) return a.id - b.id;
      if (x === null) return 1;  // missing scores last, whatever the direction
      if (y === null) return -1;
      return x < y ? -dir : dir;
    });
    state.page = 0;
    render();
  }
  function render() {
    var start = state.page * PAGE, rowsHere = state.shown.slice(start, start + PAGE);
    var frag = document.createDocumentFragment();
    rowsHere.forEach(function (r) {
      var tr = document.createElement("tr");
      tr.className = r.count === 0 ? "latent dead" : "latent";
      var link = document.createElement("a");
      link.href = "latents/" + r.id + ".html";
      link.textContent = String(r.id);
      cell(tr, "", "num").appendChild(link);
      cell(tr, fmt(r.density), "num");
      cell(tr, fmt(r.max), "num");
      cell(tr, fmt(r.mean), "num");
      if (hasScores) cell(tr, fmt(r.score), "num");
      var toks = cell(tr, "");
      r.tokens.forEach(function (t) {
        var chip = document.createElement("span");
        chip.className = "chip";
        chip.textContent = t;
        toks.appendChild(chip);
      });
      if (hasScores) cell(tr, r.explanation || "");
      frag.appendChild(tr);
    });
    body.replaceChildren(frag);
    var end = Math.min(start + PAGE, state.shown.length);
    status.textContent = state.shown.length
      ? (start + 1) + "–" + end + " of " + state.shown.length + " latents"
      : "no latent matches";
    document.getElementById("prev").disabled = state.page === 0;
    document.getElementById("next").disabled = end >= state.shown.length;
    table.querySelectorAll("th button").forEach(function (b) {
      if (b.dataset.sort === state.key) b.setAttribute("aria-sort", state.dir > 0 ? "ascending" : "descending");
      else b.removeAttribute("aria-sort");
    });
  }
  table.querySelectorAll("th button").forEach(function (b) {
    b.addEventListener("click", function () {
      var key = b.dataset.sort;
      // Statistics read best largest-first; ids smallest-first.
      state.dir = key === state.key ? -state.dir : (key === "id" ? 1 : -1);
      state.key = key;
      sort();
    });
  });
  search.addEventListener("input", filter);
  hideDead.addEventListener("change", filter);
  document.getElementById("prev").addEventListener("click", function () { state.page--; render(); });
  document.getElementById("next").addEventListener("click", function () { state.page++; render(); });
  // index.html?q=...&sort=... opens a search or an order (links can share them).
  var params = new URLSearchParams(window.location.search);
  if (params.get("q")) search.value = params.get("q");
  var sortable = Array.prototype.map.call(table.querySelectorAll("th button"), function (b) {
    return b.dataset.sort;
  });
  if (sortable.indexOf(params.get("sort")) !== -1) {
    state.key = params.get("sort");
    state.dir = state.key === "id" ? 1 : -1;
  }
  filter();
})();
