// The page of unet.app: place the photo under the head oval, segment, fix labels with one press.
//
// Coordinates: the stage is the model's input frame, a square of `side` CSS pixels. A photo pixel
// (px, py) is drawn at stage point (px * zoom + ox, py * zoom + oy). The frame therefore shows the
// photo square x = -ox / zoom, y = -oy / zoom, side = side / zoom: that square is the crop the
// server resizes to the model's input size. After "Segment", the result (one DUST_FILL mask id
// per pixel of the photo box it covers) is sampled once at the stage's device pixels; the overlay,
// the outlines, the hover highlight and hit tests all read that sampled map, so a relabel only
// recolours it from a mask -> label table.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const stage = $("stage");
  const layers = {
    photo: $("photo-layer"), overlay: $("overlay-layer"), outline: $("outline-layer"), highlight: $("highlight-layer"),
  };
  const MIN_ZOOM_SIDE = 16; // the frame may be at most this many times the photo's longest side...
  const MAX_ZOOM = 8; // ...and at least 1/8 of the stage in photo pixels
  const CLICK_SLOP = 4; // CSS px a press may move and still count as a press, not a drag

  const state = {
    config: null,
    photo: null, // {id, name, width, height, image}
    view: { zoom: 1, ox: 0, oy: 0 },
    mode: "empty", // "empty" | "place" | "result"
    busy: false,
    result: null,
    undo: [],
    redo: [],
    hover: -1,
  };
  const timings = { segment: [], relabel: [] };
  let messageTimer = 0;

  // ---------------------------------------------------------------- messages and requests

  function showMessage(text, kind = "error") {
    const box = $("message");
    box.textContent = text;
    box.className = kind;
    clearTimeout(messageTimer);
    if (kind === "info") messageTimer = setTimeout(() => { if (box.textContent === text) box.textContent = ""; }, 8000);
  }

  async function request(url, options = {}) {
    let response;
    try {
      response = await fetch(url, options);
    } catch (error) {
      throw new Error("The server did not answer: is `python -m unet.app` still running?");
    }
    if (!response.ok) {
      let text = `${response.status} ${response.statusText}`;
      try { text = (await response.json()).error || text; } catch (error) { /* not JSON: keep the status */ }
      throw new Error(text);
    }
    return response;
  }

  const postJSON = (url, body) => request(url, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });

  // ---------------------------------------------------------------- geometry

  function stageSide() { return stage.clientWidth; }
  // The stage side state.view was set for. The browser lays out a resized window before its
  // "resize" event rescales the view: until then the crop is the view's, at this side.
  let shownSide = 0;

  function resizeLayers() {
    const ratio = window.devicePixelRatio || 1;
    const pixels = Math.round(stageSide() * ratio);
    for (const canvas of Object.values(layers)) {
      canvas.width = pixels;
      canvas.height = pixels;
    }
    drawOval();
  }

  function drawOval() {
    if (!state.config) return;
    const side = stageSide();
    const oval = state.config.head_oval;
    const shape = $("oval-shape");
    shape.setAttribute("cx", oval.centre_x * side);
    shape.setAttribute("cy", oval.centre_y * side);
    shape.setAttribute("rx", (oval.width / 2) * side);
    shape.setAttribute("ry", (oval.height / 2) * side);
    const caption = $("oval-caption");
    caption.setAttribute("x", oval.centre_x * side);
    caption.setAttribute("y", (oval.centre_y + oval.height / 2) * side + 14);
  }

  function crop() {
    const { zoom, ox, oy } = state.view;
    return { x: -ox / zoom, y: -oy / zoom, side: shownSide / zoom };
  }

  function fitPhoto() {
    const side = stageSide();
    const { width, height } = state.photo;
    const zoom = side / Math.max(width, height);
    state.view = { zoom, ox: (side - width * zoom) / 2, oy: (side - height * zoom) / 2 };
  }

  function zoomLimits() {
    const longest = Math.max(state.photo.width, state.photo.height);
    return [stageSide() / (MIN_ZOOM_SIDE * longest), MAX_ZOOM];
  }

  function zoomAt(x, y, factor) {
    const view = state.view;
    const [low, high] = zoomLimits();
    const zoom = Math.min(high, Math.max(low, view.zoom * factor));
    const applied = zoom / view.zoom;
    // the photo point under (x, y) stays under it
    state.view = { zoom, ox: x - (x - view.ox) * applied, oy: y - (y - view.oy) * applied };
    drawPhoto();
  }

  function panBy(dx, dy) {
    state.view.ox += dx;
    state.view.oy += dy;
    drawPhoto();
  }

  function stagePoint(event) {
    const rect = stage.getBoundingClientRect();
    return { x: event.clientX - rect.left, y: event.clientY - rect.top };
  }

  // ---------------------------------------------------------------- drawing

  function context(canvas) {
    const ctx = canvas.getContext("2d");
    const ratio = canvas.width / stageSide();
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    return ctx;
  }

  function drawPhoto() {
    const ctx = context(layers.photo);
    if (!state.photo) return;
    const { zoom, ox, oy } = state.view;
    ctx.imageSmoothingQuality = "high";
    ctx.drawImage(state.photo.image, ox, oy, state.photo.width * zoom, state.photo.height * zoom);
  }

  function clearResultLayers() {
    for (const name of ["overlay", "outline", "highlight"]) context(layers[name]);
  }

  // The result's mask ids at every device pixel of the stage (-1 outside the result).
  function sampleMasks(result) {
    const canvas = layers.overlay;
    const ratio = canvas.width / stageSide();
    const { zoom, ox, oy } = state.view;
    const [x0, y0, x1, y1] = result.box;
    const sx = result.width / (x1 - x0);
    const sy = result.height / (y1 - y0);
    const columns = new Int32Array(canvas.width);
    for (let cx = 0; cx < canvas.width; cx++) {
      const rx = Math.floor((((cx + 0.5) / ratio - ox) / zoom - x0) * sx);
      columns[cx] = rx >= 0 && rx < result.width ? rx : -1;
    }
    const sampled = new Int32Array(canvas.width * canvas.height).fill(-1);
    for (let cy = 0; cy < canvas.height; cy++) {
      const ry = Math.floor((((cy + 0.5) / ratio - oy) / zoom - y0) * sy);
      if (ry < 0 || ry >= result.height) continue;
      const row = ry * result.width;
      const out = cy * canvas.width;
      for (let cx = 0; cx < canvas.width; cx++) {
        if (columns[cx] >= 0) sampled[out + cx] = result.masks[row + columns[cx]];
      }
    }
    return sampled;
  }

  function packedColour(label, alpha = 255) {
    const [r, g, b] = state.config.palette[label];
    return ((alpha << 24) | (b << 16) | (g << 8) | r) >>> 0;
  }

  function paintOverlay() {
    const result = state.result;
    const colours = new Uint32Array(result.labelOf.length);
    result.labelOf.forEach((label, region) => { colours[region] = label === 0 ? 0 : packedColour(label); });
    const canvas = layers.overlay;
    const image = new ImageData(canvas.width, canvas.height);
    const pixels = new Uint32Array(image.data.buffer);
    const sampled = result.sampled;
    for (let i = 0; i < sampled.length; i++) {
      if (sampled[i] >= 0) pixels[i] = colours[sampled[i]];
    }
    canvas.getContext("2d").putImageData(image, 0, 0);
  }

  function paintOutlines() {
    const canvas = layers.outline;
    const { width, height } = canvas;
    const image = new ImageData(width, height);
    const pixels = new Uint32Array(image.data.buffer);
    const sampled = state.result.sampled;
    const line = 0xf0ffffff; // white, nearly opaque
    for (let y = 0; y < height; y++) {
      for (let x = 0; x < width; x++) {
        const i = y * width + x;
        const id = sampled[i];
        if (id < 0) continue;
        if ((x + 1 < width && sampled[i + 1] !== id && sampled[i + 1] >= 0)
            || (y + 1 < height && sampled[i + width] !== id && sampled[i + width] >= 0)) pixels[i] = line;
      }
    }
    canvas.getContext("2d").putImageData(image, 0, 0);
  }

  function paintHighlight() {
    const canvas = layers.highlight;
    const ctx = canvas.getContext("2d");
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    if (!state.result || state.hover < 0) return;
    const image = new ImageData(canvas.width, canvas.height);
    const pixels = new Uint32Array(image.data.buffer);
    const sampled = state.result.sampled;
    const tint = 0x66ffffff;
    for (let i = 0; i < sampled.length; i++) if (sampled[i] === state.hover) pixels[i] = tint;
    ctx.putImageData(image, 0, 0);
  }

  function regionAt(point) {
    const result = state.result;
    if (!result) return -1;
    const ratio = layers.overlay.width / stageSide();
    const cx = Math.floor(point.x * ratio);
    const cy = Math.floor(point.y * ratio);
    if (cx < 0 || cy < 0 || cx >= layers.overlay.width || cy >= layers.overlay.height) return -1;
    return result.sampled[cy * layers.overlay.width + cx];
  }

  // ---------------------------------------------------------------- labels, legend, picker

  const labelName = (label) => state.config.labels[label];
  const percent = (share) => `${Math.round(share * 100)}%`;

  function swatch(label) {
    const span = document.createElement("span");
    span.className = "swatch";
    span.style.background = `rgb(${state.config.palette[label].join(",")})`;
    return span;
  }

  function renderLegend() {
    const legend = $("legend");
    legend.replaceChildren();
    const result = state.result;
    if (!result) {
      legend.innerHTML = '<li class="empty">none yet</li>';
      return;
    }
    const counts = new Float64Array(state.config.labels.length);
    let total = 0;
    for (const region of result.regions.values()) {
      counts[result.labelOf[region.id]] += region.pixels;
      total += region.pixels;
    }
    const present = [...counts.keys()].filter((label) => counts[label] > 0).sort((a, b) => counts[b] - counts[a]);
    for (const label of present) {
      const item = document.createElement("li");
      item.dataset.label = label;
      const name = document.createElement("span");
      name.textContent = labelName(label);
      const share = document.createElement("span");
      share.className = "share";
      share.textContent = `${(100 * counts[label] / total).toFixed(1)}%`;
      item.append(swatch(label), name, share);
      legend.append(item);
    }
  }

  // The labels a region may be instead, most likely first (its pooled statistics, current label left out).
  function alternatives(region) {
    const current = state.result.labelOf[region.id];
    return region.shares.map((share, label) => ({ label, share }))
      .filter((option) => option.label !== current)
      .sort((a, b) => b.share - a.share);
  }

  function showTooltip(point, regionId) {
    const tooltip = $("tooltip");
    if (regionId < 0) {
      tooltip.hidden = true;
      return;
    }
    const region = state.result.regions.get(regionId);
    const label = state.result.labelOf[regionId];
    const share = region.shares[label];
    tooltip.replaceChildren();
    const strong = document.createElement("strong");
    strong.textContent = labelName(label);
    const detail = document.createElement("small");
    const edited = label !== region.label ? `, set by you (DUST_FILL said ${labelName(region.label)})` : "";
    detail.textContent = ` region ${regionId}, ${region.pixels.toLocaleString("en")} px${edited}`;
    tooltip.append(swatch(label), " ", strong, ` ${percent(share)}`, detail);
    tooltip.dataset.region = regionId;
    tooltip.hidden = false;
    const side = stageSide();
    tooltip.style.left = `${Math.min(point.x + 14, side - tooltip.offsetWidth - 4)}px`;
    tooltip.style.top = `${Math.min(point.y + 16, side - tooltip.offsetHeight - 4)}px`;
  }

  function openPicker(point, regionId) {
    const picker = $("picker");
    const region = state.result.regions.get(regionId);
    const current = state.result.labelOf[regionId];
    picker.dataset.region = regionId;
    $("picker-title").textContent =
      `Region ${regionId} is ${labelName(current)} (${percent(region.shares[current])}). Is it…`;
    const options = $("picker-options");
    options.replaceChildren();
    for (const option of alternatives(region).slice(0, 4)) {
      const button = document.createElement("button");
      button.type = "button";
      button.dataset.label = option.label;
      const share = document.createElement("span");
      share.className = "share";
      share.textContent = percent(option.share);
      button.append(swatch(option.label), labelName(option.label), share);
      button.addEventListener("click", () => relabel(regionId, option.label));
      options.append(button);
    }
    const other = $("picker-other");
    other.replaceChildren(new Option("—", ""));
    state.config.labels.forEach((name, label) => { if (label !== current) other.append(new Option(name, label)); });
    picker.hidden = false;
    const side = stageSide();
    picker.style.left = `${Math.max(4, Math.min(point.x + 8, side - picker.offsetWidth - 4))}px`;
    picker.style.top = `${Math.max(4, Math.min(point.y + 8, side - picker.offsetHeight - 4))}px`;
    $("tooltip").hidden = true;
  }

  function closePicker() { $("picker").hidden = true; }

  // ---------------------------------------------------------------- edits

  function repaintLabels() {
    paintOverlay();
    renderLegend();
    $("undo").disabled = state.undo.length === 0;
    $("redo").disabled = state.redo.length === 0;
  }

  function timeRepaint(name, change) {
    const started = performance.now();
    performance.mark(`${name}-start`);
    change();
    repaintLabels();
    const painted = performance.now();
    requestAnimationFrame(() => {
      performance.mark(`${name}-end`);
      timings.relabel.push({ what: name, update_ms: painted - started, to_frame_ms: performance.now() - started });
    });
  }

  function relabel(regionId, label) {
    closePicker();
    const from = state.result.labelOf[regionId];
    if (from === label) return;
    timeRepaint("relabel", () => {
      state.result.labelOf[regionId] = label;
      state.undo.push({ region: regionId, from, to: label });
      state.redo = [];
    });
  }

  function undo() {
    const edit = state.undo.pop();
    if (!edit) return;
    timeRepaint("undo", () => { state.result.labelOf[edit.region] = edit.from; state.redo.push(edit); });
  }

  function redo() {
    const edit = state.redo.pop();
    if (!edit) return;
    timeRepaint("redo", () => { state.result.labelOf[edit.region] = edit.to; state.undo.push(edit); });
  }

  const edits = () => state.undo.map((edit) => ({ region: edit.region, label: edit.to }));

  // ---------------------------------------------------------------- photo and segmentation

  function setMode(mode) {
    state.mode = mode;
    stage.classList.toggle("empty", mode === "empty");
    stage.classList.toggle("result", mode === "result");
    const placing = mode === "place";
    for (const id of ["zoom-in", "zoom-out", "fit"]) $(id).disabled = !placing;
    $("segment").disabled = !placing || state.busy;
    $("segment").hidden = mode === "result";
    $("adjust").hidden = mode !== "result";
    for (const id of ["download-labels", "download-regions", "download-edits"]) $(id).disabled = mode !== "result";
    $("hint").textContent = {
      empty: "Choose or drop a photo (JPEG, PNG or WebP).",
      place: "Drag the photo and zoom (mouse wheel, pinch, or the buttons) until the head fills the yellow oval, "
        + "then press Segment.",
      result: "Hover a region to see its label and pooled confidence; press it to pick another label.",
    }[mode];
    if (mode !== "result") {
      state.result = null;
      state.undo = [];
      state.redo = [];
      state.hover = -1;
      closePicker();
      $("tooltip").hidden = true;
      clearResultLayers();
      repaintControls();
    }
  }

  function repaintControls() {
    renderLegend();
    $("undo").disabled = state.undo.length === 0;
    $("redo").disabled = state.redo.length === 0;
  }

  async function upload(file) {
    if (state.busy) return;
    showMessage(`Reading ${file.name}…`, "info");
    let described;
    try {
      const response = await request("api/images", {
        method: "POST",
        headers: { "Content-Type": file.type || "application/octet-stream", "X-Filename": encodeURIComponent(file.name) },
        body: file,
      });
      described = await response.json();
    } catch (error) {
      showMessage(error.message);
      return;
    }
    const image = new Image();
    image.src = `api/images/${described.id}`;
    try {
      await image.decode();
    } catch (error) {
      showMessage(`${file.name}: the browser cannot show the decoded photo`);
      return;
    }
    state.photo = { ...described, image };
    fitPhoto();
    setMode("place");
    drawPhoto();
    const reduced = described.downscaled
      ? ` (reduced from ${described.original_width}×${described.original_height} to the ${described.max_side} px limit)` : "";
    showMessage(`${described.name}: ${described.width}×${described.height}${reduced}`, "info");
  }

  async function runSegmentation() {
    if (state.mode !== "place" || state.busy) return;
    state.busy = true;
    $("segment").disabled = true;
    $("busy").hidden = false;
    const started = performance.now();
    performance.mark("segment-start");
    try {
      const response = await postJSON("api/segment", { image: state.photo.id, crop: crop() });
      const described = await response.json();
      const answered = performance.now();
      const masks = new Int32Array(await (await request(`api/segmentations/${described.id}/masks`)).arrayBuffer());
      const fetched = performance.now();
      showResult(described, masks);
      const drawn = performance.now();
      requestAnimationFrame(() => {
        performance.mark("segment-end");
        timings.segment.push({
          total_ms: performance.now() - started, server_ms: answered - started, masks_ms: fetched - answered,
          draw_ms: drawn - fetched, server_timings_ms: described.timings_ms,
        });
      });
      showMessage("");
    } catch (error) {
      showMessage(error.message);
    } finally {
      state.busy = false;
      $("busy").hidden = true;
      $("segment").disabled = state.mode !== "place";
    }
  }

  function showResult(described, masks) {
    const regions = new Map(described.regions.map((region) => [region.id, region]));
    const size = described.regions.reduce((top, region) => Math.max(top, region.id + 1), 0);
    const labelOf = new Int32Array(size);
    for (const region of described.regions) labelOf[region.id] = region.label;
    setMode("result");
    state.result = { ...described, masks, regions, labelOf };
    state.result.sampled = sampleMasks(state.result);
    paintOutlines();
    repaintLabels();
  }

  async function download(kind) {
    const result = state.result;
    if (!result) return;
    const stem = state.photo.name.replace(/\.[^.]*$/, "") || "photo";
    const base = `api/segmentations/${result.id}`;
    try {
      const response = kind === "regions"
        ? await request(`${base}/regions.png`)
        : await postJSON(`${base}/${kind === "labels" ? "labels.png" : "edits.json"}`, { edits: edits() });
      const link = document.createElement("a");
      link.href = URL.createObjectURL(await response.blob());
      link.download = `${stem}_${kind}.${kind === "edits" ? "json" : "png"}`;
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(link.href), 10000);
    } catch (error) {
      showMessage(error.message);
    }
  }

  // ---------------------------------------------------------------- input: placement, hover, press

  const pointers = new Map();
  let press = null; // where the pointer went down in result mode

  function pinchGeometry() {
    const [a, b] = [...pointers.values()];
    return { x: (a.x + b.x) / 2, y: (a.y + b.y) / 2, distance: Math.hypot(a.x - b.x, a.y - b.y) };
  }

  stage.addEventListener("pointerdown", (event) => {
    if (event.target.closest("#picker")) return;
    const point = stagePoint(event);
    if (state.mode === "result") {
      press = point;
      return;
    }
    if (state.mode !== "place") return;
    stage.setPointerCapture(event.pointerId);
    pointers.set(event.pointerId, point);
    stage.classList.add("dragging");
  });

  stage.addEventListener("pointermove", (event) => {
    const point = stagePoint(event);
    if (state.mode === "result") {
      if (event.target.closest("#picker")) return;
      const region = regionAt(point);
      if (region !== state.hover) {
        state.hover = region;
        paintHighlight();
      }
      if ($("picker").hidden) showTooltip(point, region);
      return;
    }
    const previous = pointers.get(event.pointerId);
    if (!previous) return;
    if (pointers.size === 1) {
      pointers.set(event.pointerId, point);
      panBy(point.x - previous.x, point.y - previous.y);
    } else if (pointers.size === 2) {
      const before = pinchGeometry();
      pointers.set(event.pointerId, point);
      const after = pinchGeometry();
      panBy(after.x - before.x, after.y - before.y);
      if (before.distance > 0) zoomAt(after.x, after.y, after.distance / before.distance);
    }
  });

  function endPointer(event) {
    pointers.delete(event.pointerId);
    if (pointers.size === 0) stage.classList.remove("dragging");
  }
  stage.addEventListener("pointerup", (event) => {
    endPointer(event);
    if (state.mode !== "result" || !press || event.target.closest("#picker")) return;
    const point = stagePoint(event);
    const moved = Math.hypot(point.x - press.x, point.y - press.y);
    press = null;
    const region = regionAt(point);
    if (moved <= CLICK_SLOP && region >= 0) openPicker(point, region);
    else closePicker();
  });
  stage.addEventListener("pointercancel", endPointer);
  stage.addEventListener("pointerleave", () => {
    if (state.mode !== "result") return;
    $("tooltip").hidden = true;
    if (state.hover !== -1) {
      state.hover = -1;
      paintHighlight();
    }
  });

  stage.addEventListener("wheel", (event) => {
    if (state.mode !== "place") return;
    event.preventDefault();
    const unit = event.deltaMode === 1 ? 16 : event.deltaMode === 2 ? stageSide() : 1;
    const point = stagePoint(event);
    zoomAt(point.x, point.y, Math.exp(-event.deltaY * unit * 0.0015));
  }, { passive: false });

  stage.addEventListener("keydown", (event) => {
    if (state.mode !== "place") return;
    const step = event.shiftKey ? 40 : 8;
    const moves = { ArrowLeft: [-step, 0], ArrowRight: [step, 0], ArrowUp: [0, -step], ArrowDown: [0, step] };
    const centre = stageSide() / 2;
    if (moves[event.key]) panBy(...moves[event.key]);
    else if (event.key === "+" || event.key === "=") zoomAt(centre, centre, 1.1);
    else if (event.key === "-") zoomAt(centre, centre, 1 / 1.1);
    else return;
    event.preventDefault();
  });

  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape") closePicker();
    if (state.mode !== "result" || !(event.ctrlKey || event.metaKey)) return;
    const key = event.key.toLowerCase();
    if (key === "z" && !event.shiftKey) undo();
    else if ((key === "z" && event.shiftKey) || key === "y") redo();
    else return;
    event.preventDefault();
  });

  // ---------------------------------------------------------------- controls

  $("file").addEventListener("change", (event) => {
    if (event.target.files.length) upload(event.target.files[0]);
    event.target.value = "";
  });
  for (const target of [stage, document.body]) {
    target.addEventListener("dragover", (event) => { event.preventDefault(); stage.classList.add("drop-target"); });
    target.addEventListener("dragleave", () => stage.classList.remove("drop-target"));
    target.addEventListener("drop", (event) => {
      event.preventDefault();
      event.stopPropagation();
      stage.classList.remove("drop-target");
      if (event.dataTransfer.files.length) upload(event.dataTransfer.files[0]);
    });
  }
  $("zoom-in").addEventListener("click", () => zoomAt(stageSide() / 2, stageSide() / 2, 1.25));
  $("zoom-out").addEventListener("click", () => zoomAt(stageSide() / 2, stageSide() / 2, 1 / 1.25));
  $("fit").addEventListener("click", () => { fitPhoto(); drawPhoto(); });
  $("segment").addEventListener("click", runSegmentation);
  $("adjust").addEventListener("click", () => setMode("place"));
  $("opacity").addEventListener("input", (event) => { layers.overlay.style.opacity = event.target.value / 100; });
  $("show-outlines").addEventListener("change", (event) => { layers.outline.hidden = !event.target.checked; });
  $("undo").addEventListener("click", undo);
  $("redo").addEventListener("click", redo);
  $("picker-close").addEventListener("click", closePicker);
  $("picker-other").addEventListener("change", (event) => {
    if (event.target.value !== "") relabel(Number($("picker").dataset.region), Number(event.target.value));
  });
  $("download-labels").addEventListener("click", () => download("labels"));
  $("download-regions").addEventListener("click", () => download("regions"));
  $("download-edits").addEventListener("click", () => download("edits"));
  window.addEventListener("resize", () => {
    // keep the crop: scale the view with the stage, then resample the result for the new pixels
    if (!shownSide || !stageSide()) return;
    const ratio = stageSide() / shownSide;
    shownSide = stageSide();
    state.view = { zoom: state.view.zoom * ratio, ox: state.view.ox * ratio, oy: state.view.oy * ratio };
    resizeLayers();
    drawPhoto();
    if (state.result) {
      state.result.sampled = sampleMasks(state.result);
      paintOutlines();
      paintOverlay();
      paintHighlight();
    }
  });

  // For tests and measurements: the placement, the result's geometry and the timings (read-only copies).
  window.unetApp = {
    view: () => ({ ...state.view, side: shownSide }),
    crop,
    mode: () => state.mode,
    result: () => state.result && { id: state.result.id, box: state.result.box, width: state.result.width,
      height: state.result.height, labelOf: [...state.result.labelOf] },
    edits,
    timings: () => JSON.parse(JSON.stringify(timings)),
  };

  async function start() {
    layers.overlay.style.opacity = $("opacity").value / 100;
    try {
      state.config = await (await request("api/config")).json();
    } catch (error) {
      showMessage(error.message);
      return;
    }
    $("model-info").textContent =
      `model ${state.config.checkpoint}, ${state.config.model_input} px input, ${state.config.device}`;
    shownSide = stageSide();
    resizeLayers();
    setMode("empty");
  }
  start();
})();
