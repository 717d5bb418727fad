// fast-steer feature dashboard: the index table. Its rows come from index-data.js (window.FS_INDEX, loaded by a
// <script> tag, so the page works from file://); they are searched, sorted and drawn a page at a time.
(function () {
  "use strict";
  var PAGE = 200;
  var data = window.FS_INDEX;
  var rows = data.rows; // [feature, label, rubric, detection, density, special share]
  var haystack = rows.map(function (r) { return (r[0] + " " + (r[1] || "")).toLowerCase(); });
  var order = rows.map(function (_, i) { return i; });
  var state = { col: 0, dir: 1, query: "", shown: PAGE, matches: order };
  var body = document.querySelector("#features tbody");
  var count = document.getElementById("count");
  var more = document.getElementById("more");

  function fmt(value, col) {
    if (value === null || value === undefined) return "";
    if (col === 2) return value.toFixed(0);
    if (col === 3 || col === 5) return value.toFixed(2);
    if (col === 4) return value < 0.001 ? value.toExponential(1) : value.toFixed(4);
    return String(value);
  }

  function compare(a, b) {
    var x = rows[a][state.col], y = rows[b][state.col];
    var missingX = x === null || x === "", missingY = y === null || y === "";
    if (missingX || missingY) return missingX === missingY ? rows[a][0] - rows[b][0] : (missingX ? 1 : -1);
    if (x < y) return -state.dir;
    if (x > y) return state.dir;
    return rows[a][0] - rows[b][0];
  }

  function filter() {
    var words = state.query.toLowerCase().split(/\s+/).filter(Boolean);
    state.matches = order.filter(function (i) {
      return words.every(function (w) { return haystack[i].indexOf(w) !== -1; });
    });
    state.matches.sort(compare);
  }

  function cell(tr, text, numeric) {
    var td = document.createElement("td");
    if (numeric) td.className = "num";
    td.textContent = text;
    tr.appendChild(td);
    return td;
  }

  function draw() {
    var fragment = document.createDocumentFragment();
    state.matches.slice(0, state.shown).forEach(function (i) {
      var r = rows[i], tr = document.createElement("tr");
      var link = document.createElement("a");
      link.href = "features/" + r[0] + ".html";
      link.textContent = String(r[0]);
      cell(tr, "", true).appendChild(link);
      cell(tr, r[1] || "", false);
      for (var c = 2; c < 6; c++) cell(tr, fmt(r[c], c), true);
      fragment.appendChild(tr);
    });
    body.replaceChildren(fragment);
    count.textContent = state.matches.length + " of " + rows.length + " features" +
      (state.matches.length > state.shown ? " (first " + state.shown + " shown)" : "");
    more.hidden = state.matches.length <= state.shown;
    document.querySelectorAll("#features th").forEach(function (th) {
      var sorted = Number(th.dataset.col) === state.col;
      th.classList.toggle("sorted-asc", sorted && state.dir === 1);
      th.classList.toggle("sorted-desc", sorted && state.dir === -1);
    });
  }

  document.getElementById("search").addEventListener("input", function (event) {
    state.query = event.target.value;
    state.shown = PAGE;
    filter();
    draw();
  });
  document.querySelectorAll("#features th").forEach(function (th) {
    th.addEventListener("click", function () {
      var col = Number(th.dataset.col);
      state.dir = col === state.col ? -state.dir : (th.dataset.type === "num" && col !== 0 ? -1 : 1);
      state.col = col;
      filter();
      draw();
    });
  });
  more.addEventListener("click", function () { state.shown += PAGE; draw(); });
  filter();
  draw();
})();
