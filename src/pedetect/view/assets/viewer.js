/* pedetect study viewer: written for this report, no library, nothing fetched from the network.
 *
 * The page carries its study as JSON (#study-data: the study's report record plus a "viewer"
 * section written by pedetect.infer.report); slices are JPEG files beside the page, one per slice,
 * the three windows in its colour channels (an SVG filter shows one). The state a test or a person
 * may want to read is mirrored on <body>: data-slice, data-window, data-overlay, data-candidates
 * (outlines on / off) and data-candidates-shown (the candidates drawn on the current slice).
 */
(function () {
  "use strict";

  var data = JSON.parse(document.getElementById("study-data").textContent);
  var viewer = data.viewer;
  var files = viewer.slices;
  var count = files.length;
  var probabilities = data.model_slice_probabilities;
  var written = data.slice_probabilities;
  var threshold = data.threshold;
  var suspicious = viewer.suspicious; // slice indices, most suspicious first
  var location = viewer.location; // {grid, crop_box: [left, top, width, height] fractions, cells: N x G*G} or null
  // Clot candidates, strongest first: picture_index (the key slice), picture_point and picture_outline
  // in [row, column] fractions of the slice, slice_first / slice_index / slice_last (series positions).
  var candidates = data.candidates || [];

  var body = document.body;
  var stage = document.getElementById("stage");
  var frame = document.getElementById("frame");
  var image = document.getElementById("slice");
  var overlay = document.getElementById("overlay");
  var candidatesOverlay = document.getElementById("candidates-overlay");
  var curve = document.getElementById("curve");
  var overlayToggle = document.getElementById("overlay-toggle");
  var candidatesToggle = document.getElementById("candidates-toggle");

  var state = { index: 0, window: 0, overlay: true, suspicious: -1, candidates: true };
  var cache = {}; // index -> Image, kept near the current slice so scrolling shows decoded images
  var PRELOAD = 12;

  function text(id, value) { document.getElementById(id).textContent = value; }
  function fixed(value, digits) { return value === null || value === undefined ? "–" : Number(value).toFixed(digits); }

  /* ---- static parts: header, exam labels, windows ---- */
  text("study-uid", data.study_uid);
  document.title = "pedetect · " + data.study_uid;
  var verdict = document.getElementById("study-verdict");
  var decision = data.pe_positive ? "PE positive" : "PE negative";
  verdict.innerHTML = "";
  verdict.appendChild(document.createTextNode("model PE probability " + fixed(data.pe_probability, 3) + " · after the label rules: "));
  var decisionSpan = document.createElement("span");
  decisionSpan.className = data.pe_positive ? "positive" : "negative";
  decisionSpan.textContent = decision;
  verdict.appendChild(decisionSpan);
  if (data.repair.pe_positive_changed) {
    var changed = document.createElement("span");
    changed.className = "changed";
    changed.textContent = " (changed by the repair)";
    verdict.appendChild(changed);
  }
  text("slice-count", String(Math.max(count - 1, 0)));

  var labels = document.getElementById("exam-labels");
  data.repair.labels.forEach(function (row) {
    var tr = document.createElement("tr");
    var name = document.createElement("td");
    name.textContent = row.label;
    var model = document.createElement("td");
    model.textContent = fixed(row.model_probability, 3);
    var after = document.createElement("td");
    after.textContent = row.decision ? "yes" : "no";
    after.className = row.decision ? "positive" : "";
    after.title = "written value " + fixed(row.written_probability, 4);
    if (row.changed_by_repair) {
      after.textContent += " (repair)";
      after.className += " changed";
      after.title += ": the label rules moved it across " + threshold;
    }
    tr.appendChild(name); tr.appendChild(model); tr.appendChild(after);
    labels.appendChild(tr);
  });
  text("repair-note", data.repair.changed
    ? "The label rules changed this study's values (" + data.repair.summary + "); the model's own probabilities are shown."
    : "The model's values already obeyed the label rules.");
  var notes = [];
  if (data.error) notes.push(data.error);
  if (data.skipped_files.length) notes.push(data.skipped_files.length + " file(s) not shown: " +
    data.skipped_files.map(function (f) { return f.reason; }).filter(function (r, i, all) { return all.indexOf(r) === i; }).join("; "));
  text("study-notes", notes.join(" · "));

  var windowButtons = viewer.windows.map(function (w, k) {
    var button = document.createElement("button");
    button.type = "button";
    button.textContent = w.label + " (" + (k + 1) + ")";
    button.title = "L " + w.level + " / W " + w.width;
    button.addEventListener("click", function () { setWindow(k); });
    document.getElementById("windows").appendChild(button);
    return button;
  });

  /* ---- the candidates' list: click to go to a candidate's key slice ---- */
  var candidateList = document.getElementById("candidates");
  candidates.forEach(function (c) {
    var item = document.createElement("li");
    var button = document.createElement("button");
    button.type = "button";
    button.className = "candidate side-" + c.side;
    button.dataset.candidate = String(c.candidate);
    button.textContent = c.side + " · score " + fixed(c.score, 2) + " · slices " + c.slice_first + "–" + c.slice_last;
    button.title = "Go to its key slice (" + c.picture_index + "); point at row " + fixed(c.row, 1) + ", column " +
      fixed(c.col, 1) + " of the image" + (c.patient_mm ? "; patient (mm) " + c.patient_mm.map(function (v) { return fixed(v, 1); }).join(", ") : "");
    button.addEventListener("click", function () { setCandidates(true); show(c.picture_index); });
    item.appendChild(button);
    candidateList.appendChild(item);
  });
  text("candidates-note", candidates.length
    ? candidates.length + " candidate(s), strongest first: where the slice CNN's activation map peaks (docs/localisation.md). " +
      "Outline on the key slice, a cross on the other slices it spans."
    : "No clot candidate: the CNN's activation maps have no peak above the localisation's minimum score.");
  if (!candidates.length) candidatesToggle.disabled = true;

  // The candidates on a slice: [candidate, on its key slice] for each whose slice range covers it.
  function candidatesOn(index) {
    var found = [];
    candidates.forEach(function (c) {
      var first = c.picture_index - (c.slice_index - c.slice_first), last = c.picture_index + (c.slice_last - c.slice_index);
      if (index >= first && index <= last) found.push([c, index === c.picture_index]);
    });
    return found;
  }

  if (!count) {
    frame.hidden = true;
    document.getElementById("no-slices").hidden = false;
  }

  /* ---- the slice ---- */
  function load(index) {
    if (!cache[index]) {
      var img = new Image();
      img.src = files[index];
      cache[index] = img;
    }
    return cache[index];
  }

  function preload(index) {
    for (var key in cache) {
      if (Math.abs(key - index) > PRELOAD) delete cache[key];
    }
    for (var d = 1; d <= PRELOAD; d++) {
      if (index + d < count) load(index + d);
      if (index - d >= 0) load(index - d);
    }
  }

  function show(index) {
    if (!count) return;
    index = Math.max(0, Math.min(count - 1, Math.round(index)));
    state.index = index;
    image.src = load(index).src;
    body.dataset.slice = String(index);
    text("slice-index", String(index));
    text("slice-z", fixed(data.z[index], 1) + " mm");
    text("slice-sop", data.sop_uids[index]);
    var p = probabilities[index];
    var line = fixed(p, 3);
    if ((p > threshold) !== (written[index] > threshold)) line += " (written " + fixed(written[index], 4) + " by the label rules)";
    text("slice-probability", line);
    var rank = suspicious.indexOf(index);
    if (rank >= 0) state.suspicious = rank;
    text("suspicious-status", suspicious.length
      ? (rank >= 0 ? "suspicious slice " + (rank + 1) + " of " + suspicious.length : suspicious.length + " suspicious slice(s)")
      : "no suspicious slice");
    drawOverlay();
    drawCurve();
    preload(index);
  }

  function setWindow(k) {
    state.window = k;
    image.style.filter = "url(#channel-" + viewer.windows[k].channel + ")";
    windowButtons.forEach(function (b, j) { b.setAttribute("aria-pressed", String(j === k)); });
    body.dataset.window = viewer.windows[k].name;
  }

  /* ---- layout: the largest square-ish frame the stage holds, keeping the slice's aspect ---- */
  function layout() {
    if (!count) return;
    var box = stage.getBoundingClientRect();
    var aspect = viewer.width / viewer.height;
    var width = Math.min(box.width, box.height * aspect);
    frame.style.width = Math.floor(width) + "px";
    frame.style.height = Math.floor(width / aspect) + "px";
    drawOverlay();
    drawCurve();
  }

  /* ---- where the model looks: the grid cells' probabilities over the CNN's crop ---- */
  var cellCanvas = document.createElement("canvas");

  // A canvas at the size it is shown (sharp on high-density screens), cleared: its 2D context.
  function fitCanvas(canvas, rect) {
    var ratio = window.devicePixelRatio || 1;
    canvas.width = Math.max(1, Math.round(rect.width * ratio));
    canvas.height = Math.max(1, Math.round(rect.height * ratio));
    var ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    return ctx;
  }

  function drawOverlay() {
    var rect = frame.getBoundingClientRect();
    var ctx = fitCanvas(overlay, rect);
    overlay.style.visibility = state.overlay ? "visible" : "hidden";
    body.dataset.overlay = state.overlay ? "on" : "off";
    drawGrid(ctx);
    var marks = fitCanvas(candidatesOverlay, rect);
    candidatesOverlay.style.visibility = state.candidates ? "visible" : "hidden";
    body.dataset.candidates = state.candidates ? "on" : "off";
    var shown = count ? candidatesOn(state.index) : [];
    body.dataset.candidatesShown = state.candidates ? shown.map(function (s) { return s[0].candidate; }).join(" ") : "";
    shown.forEach(function (s) { drawCandidate(marks, s[0], s[1]); });
  }

  // A candidate: its outline on its key slice, a cross at its point on the other slices of its range.
  function drawCandidate(ctx, c, key) {
    var ratio = window.devicePixelRatio || 1;
    var w = candidatesOverlay.width, h = candidatesOverlay.height;
    ctx.setLineDash([]);
    ctx.lineWidth = 2 * ratio;
    ctx.strokeStyle = key ? "rgba(0, 255, 170, 0.95)" : "rgba(0, 255, 170, 0.55)";
    var py = c.picture_point[0] * h, px = c.picture_point[1] * w;
    if (key && c.picture_outline.length > 2) {
      ctx.beginPath();
      c.picture_outline.forEach(function (p, k) {
        if (k === 0) ctx.moveTo(p[1] * w, p[0] * h); else ctx.lineTo(p[1] * w, p[0] * h);
      });
      ctx.closePath();
      ctx.stroke();
    } else {
      var r = 6 * ratio;
      ctx.beginPath();
      ctx.moveTo(px - r, py); ctx.lineTo(px + r, py); ctx.moveTo(px, py - r); ctx.lineTo(px, py + r);
      ctx.stroke();
    }
    ctx.font = (11 * ratio) + "px system-ui, sans-serif";
    ctx.fillStyle = ctx.strokeStyle;
    ctx.fillText("#" + c.candidate + " " + c.side, px + 8 * ratio, py - 8 * ratio);
  }

  function drawGrid(ctx) {
    var ratio = window.devicePixelRatio || 1;
    var note = document.getElementById("overlay-note");
    if (!location) {
      note.textContent = "This model has no location grid (embed.location_grid): no overlay.";
      overlayToggle.disabled = true;
      return;
    }
    var g = location.grid;
    var cells = location.cells[state.index];
    var box = location.crop_box;
    var x = box[0] * overlay.width, y = box[1] * overlay.height, w = box[2] * overlay.width, h = box[3] * overlay.height;
    // The G x G cell probabilities as a tiny image, smoothed up to the crop: each value sits at its cell's centre.
    cellCanvas.width = g; cellCanvas.height = g;
    var cellCtx = cellCanvas.getContext("2d");
    var pixels = cellCtx.createImageData(g, g);
    var best = 0;
    for (var c = 0; c < g * g; c++) {
      var p = cells[c];
      if (p > cells[best]) best = c;
      // Yellow (low) to red (high); transparent where the model sees nothing, never opaque over the anatomy.
      pixels.data[4 * c] = 255;
      pixels.data[4 * c + 1] = Math.round(220 * (1 - p));
      pixels.data[4 * c + 2] = 0;
      pixels.data[4 * c + 3] = Math.round(150 * Math.max(0, (p - 0.1) / 0.9));
    }
    cellCtx.putImageData(pixels, 0, 0);
    ctx.imageSmoothingEnabled = true;
    ctx.imageSmoothingQuality = "high";
    ctx.drawImage(cellCanvas, x, y, w, h);
    ctx.setLineDash([6 * ratio, 4 * ratio]);
    ctx.lineWidth = ratio;
    ctx.strokeStyle = "rgba(79, 179, 255, 0.8)";
    ctx.strokeRect(x + 0.5, y + 0.5, w - 1, h - 1);
    note.textContent = "Dashed: the part of the slice the CNN sees. Colour: its PE probability on each of " + g + " × " + g +
      " regions (mean over folds); highest here " + fixed(cells[best], 2) + " (row " + (Math.floor(best / g) + 1) +
      ", column " + (best % g + 1) + ").";
  }

  function setOverlay(on) {
    state.overlay = on;
    overlayToggle.checked = on;
    drawOverlay();
  }

  function setCandidates(on) {
    state.candidates = on;
    candidatesToggle.checked = on;
    drawOverlay();
  }

  /* ---- the curve: model probability per slice, threshold, suspicious slices, cursor ---- */
  var PAD = { left: 34, right: 10, top: 10, bottom: 20 };

  function curveX(index, width) {
    return PAD.left + (count > 1 ? index / (count - 1) : 0.5) * (width - PAD.left - PAD.right);
  }

  function drawCurve() {
    var ratio = window.devicePixelRatio || 1;
    var rect = curve.getBoundingClientRect();
    var ctx = fitCanvas(curve, rect);
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    var width = rect.width, height = rect.height;
    var plotH = height - PAD.top - PAD.bottom;
    function y(p) { return PAD.top + (1 - p) * plotH; }
    ctx.font = "11px system-ui, sans-serif";
    ctx.fillStyle = "#9aa3ad";
    ctx.fillText("1", 20, y(1) + 4);
    ctx.fillText(String(threshold), 10, y(threshold) + 4);
    ctx.fillText("0", 20, y(0) + 4);
    ctx.fillText("slice PE probability (model) · click to jump", PAD.left + 4, height - 5);
    ctx.strokeStyle = "rgba(255, 90, 79, 0.7)";
    ctx.setLineDash([4, 3]);
    ctx.beginPath(); ctx.moveTo(PAD.left, y(threshold)); ctx.lineTo(width - PAD.right, y(threshold)); ctx.stroke();
    ctx.setLineDash([]);
    if (!count) return;
    ctx.strokeStyle = "#4fb3ff";
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    for (var i = 0; i < count; i++) {
      if (i === 0) ctx.moveTo(curveX(i, width), y(probabilities[i])); else ctx.lineTo(curveX(i, width), y(probabilities[i]));
    }
    ctx.stroke();
    ctx.fillStyle = "#ff5a4f";
    suspicious.forEach(function (s) { ctx.beginPath(); ctx.arc(curveX(s, width), y(probabilities[s]), 3, 0, 2 * Math.PI); ctx.fill(); });
    var cx = curveX(state.index, width);
    ctx.strokeStyle = "#ffffff";
    ctx.lineWidth = 1;
    ctx.beginPath(); ctx.moveTo(cx, PAD.top); ctx.lineTo(cx, PAD.top + plotH); ctx.stroke();
  }

  curve.addEventListener("click", function (event) {
    if (!count) return;
    var rect = curve.getBoundingClientRect();
    var fraction = (event.clientX - rect.left - PAD.left) / (rect.width - PAD.left - PAD.right);
    show(fraction * (count - 1));
  });

  /* ---- navigation ---- */
  function stepSuspicious(direction) {
    if (!suspicious.length) return;
    var rank = state.suspicious + direction;
    if (rank < 0 || rank >= suspicious.length) return;
    state.suspicious = rank;
    show(suspicious[rank]);
  }

  document.getElementById("next-suspicious").addEventListener("click", function () { stepSuspicious(1); });
  document.getElementById("previous-suspicious").addEventListener("click", function () { stepSuspicious(-1); });
  overlayToggle.addEventListener("change", function () { setOverlay(overlayToggle.checked); });
  candidatesToggle.addEventListener("change", function () { setCandidates(candidatesToggle.checked); });

  var KEYS = {
    ArrowDown: function () { show(state.index + 1); }, ArrowRight: function () { show(state.index + 1); },
    ArrowUp: function () { show(state.index - 1); }, ArrowLeft: function () { show(state.index - 1); },
    PageDown: function () { show(state.index + 10); }, PageUp: function () { show(state.index - 10); },
    Home: function () { show(0); }, End: function () { show(count - 1); },
    n: function () { stepSuspicious(1); }, p: function () { stepSuspicious(-1); },
    o: function () { if (location) setOverlay(!state.overlay); },
    c: function () { if (candidates.length) setCandidates(!state.candidates); },
    "1": function () { setWindow(0); }, "2": function () { setWindow(1); }, "3": function () { setWindow(2); }
  };
  document.addEventListener("keydown", function (event) {
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    var action = KEYS[event.key];
    if (!action) return;
    event.preventDefault();
    action();
  });

  // One slice per wheel notch (a notch is 50-120 pixels, or lines); a trackpad's small deltas are
  // summed to 50 pixels a slice, so a swipe does not race through the series.
  var wheelSum = 0;
  stage.addEventListener("wheel", function (event) {
    event.preventDefault();
    if (event.deltaMode !== 0 || Math.abs(event.deltaY) >= 50) {
      wheelSum = 0;
      show(state.index + Math.sign(event.deltaY));
      return;
    }
    wheelSum += event.deltaY;
    if (Math.abs(wheelSum) >= 50) {
      show(state.index + Math.sign(wheelSum));
      wheelSum = 0;
    }
  }, { passive: false });

  window.addEventListener("resize", layout);
  setWindow(0);
  layout();
  show(0);
  stage.focus();
})();
