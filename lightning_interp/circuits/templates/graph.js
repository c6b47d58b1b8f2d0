// The side panel of the attribution graph: what a node is and its strongest connections.
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("graph-data").textContent);
  var svg = document.getElementById("graph");
  var panel = document.getElementById("details");
  var pinned = null;
  var inputs = {}, outputs = {};
  data.links.forEach(function (link) {
    (inputs[link[1]] = inputs[link[1]] || []).push([link[0], link[2]]);
    (outputs[link[0]] = outputs[link[0]] || []).push([link[1], link[2]]);
  });
  function fmt(value) {
    return value === null || value === undefined ? "–" : Number(value).toPrecision(3);
  }
  function el(tag, text, cls) {
    var node = document.createElement(tag);
    if (text !== undefined) node.textContent = text;  // textContent: tokens are untrusted
    if (cls) node.className = cls;
    return node;
  }
  function table(title, rows, id) {
    panel.appendChild(el("h3", title));
    var sorted = (rows || []).slice().sort(function (a, b) { return Math.abs(b[1]) - Math.abs(a[1]); });
    var body = el("table");
    body.id = id;
    sorted.slice(0, 8).forEach(function (row) {
      var tr = el("tr", undefined, "link");
      tr.appendChild(el("td", data.nodes[row[0]].label));
      tr.appendChild(el("td", fmt(row[1]), "num " + (row[1] >= 0 ? "pos" : "neg")));
      body.appendChild(tr);
    });
    if (!sorted.length) body.appendChild(el("tr")).appendChild(el("td", "none", "muted"));
    panel.appendChild(body);
  }
  function show(id) {
    var node = data.nodes[id];
    if (!node) return;
    panel.textContent = "";
    panel.dataset.node = id;
    panel.appendChild(el("h2", node.label));
    var facts = el("table");
    var where = node.kind === "logit" ? "output" : node.kind === "embedding" ? "embedding" : "layer " + node.layer;
    [["kind", node.kind], ["where", where + ", token " + node.ctx_idx + " “" + data.tokens[node.ctx_idx] + "”"],
     ["activation", fmt(node.activation)], ["influence (cumulative)", fmt(node.influence)]]
      .concat(node.kind === "logit" ? [["probability", fmt(node.token_prob)]] : [])
      .forEach(function (fact) {
        var tr = el("tr");
        tr.appendChild(el("td", fact[0], "muted"));
        tr.appendChild(el("td", fact[1], "num"));
        facts.appendChild(tr);
      });
    panel.appendChild(facts);
    table("strongest inputs", inputs[id], "inputs");
    table("strongest outputs", outputs[id], "outputs");
  }
  function pick(id) {
    pinned = id;
    svg.classList.toggle("focus", id !== null);
    svg.querySelectorAll(".node").forEach(function (n) { n.classList.toggle("picked", n.dataset.id === id); });
    svg.querySelectorAll(".edge").forEach(function (e) {
      e.classList.toggle("on", e.dataset.source === id || e.dataset.target === id);
    });
    if (id !== null) show(id);
  }
  svg.querySelectorAll(".node").forEach(function (n) {
    n.addEventListener("mouseenter", function () { show(n.dataset.id); });
    n.addEventListener("mouseleave", function () { if (pinned) show(pinned); });
    n.addEventListener("click", function (event) {
      event.stopPropagation();
      pick(pinned === n.dataset.id ? null : n.dataset.id);
    });
  });
  var match = /node=([^&]+)/.exec(window.location.hash);
  if (match) pick(decodeURIComponent(match[1]));
})();
