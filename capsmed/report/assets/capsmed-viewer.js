/* capsmed study viewer: wires the controls of a study report to NiiVue (niivue.umd.js, loaded
 * first). The page carries its volumes as base64 NIfTI inside <script type="application/json"
 * id="cv-data">, so nothing is fetched: the report works from file:// with no network and a
 * Content-Security-Policy that admits only this file and NiiVue's.
 *
 * Data block: {"volumes": [{"name", "role": "image"|"labels"|"heat", "base64", "colormap",
 * "opacity", "cal_min", "cal_max", "visible"}], "labels": [{"index", "name", "rgb": [r, g, b]}],
 * "background": name of label 0}. The state of the viewer is written to the container's data-state
 * attribute ("loading", "ready", or "error: ...") for readers and tests.
 */
(function () {
  "use strict";

  var root = document.getElementById("cv-viewer");
  if (!root) { return; }

  function fail(message) {
    root.setAttribute("data-state", "error: " + message);
    var box = document.getElementById("cv-status");
    if (box) { box.textContent = "The interactive viewer is unavailable: " + message +
      ". The static slices below still show the study."; }
  }

  function byId(id) { return document.getElementById(id); }

  function fmt(value) {
    if (typeof value !== "number" || !isFinite(value)) { return String(value); }
    var a = Math.abs(value);
    return (a !== 0 && (a < 0.01 || a >= 1e5)) ? value.toExponential(3) : value.toFixed(a < 10 ? 3 : 1);
  }

  if (typeof window.niivue === "undefined") { fail("the NiiVue script did not load"); return; }
  var canvas = byId("cv-canvas");
  var probe = document.createElement("canvas");
  if (!probe.getContext("webgl2")) { fail("this browser has no WebGL2"); return; }

  var cfg;
  try { cfg = JSON.parse(byId("cv-data").textContent); } catch (e) { fail("bad viewer data"); return; }
  var labelNames = {0: cfg.background || "background"};
  (cfg.labels || []).forEach(function (l) { labelNames[l.index] = l.name; });
  var labelAlpha = {};
  (cfg.labels || []).forEach(function (l) { labelAlpha[l.index] = 1; });
  var labelOn = {};
  (cfg.labels || []).forEach(function (l) { labelOn[l.index] = true; });

  var nv = new window.niivue.Niivue({
    show3Dcrosshair: true, backColor: [0, 0, 0, 1], crosshairColor: [1, 0.85, 0, 0.8],
    crosshairWidth: 0.25,
    dragAndDropEnabled: false, isColorbar: false, logLevel: "error", loadingText: "",
    isOrientCube: false, multiplanarShowRender: 1, isNearestInterpolation: true
  });

  function labelColormap() {
    var maxIndex = 0;
    (cfg.labels || []).forEach(function (l) { maxIndex = Math.max(maxIndex, l.index); });
    var cm = {R: [], G: [], B: [], A: [], I: [], labels: []};
    for (var i = 0; i <= maxIndex; i++) {
      var l = (cfg.labels || []).filter(function (x) { return x.index === i; })[0];
      var rgb = l ? l.rgb : [0, 0, 0];
      cm.R.push(rgb[0]); cm.G.push(rgb[1]); cm.B.push(rgb[2]); cm.I.push(i);
      cm.A.push(i === 0 || !l || !labelOn[i] ? 0 : Math.round(255 * labelAlpha[i]));
      cm.labels.push(l ? l.name : "");
    }
    return cm;
  }

  function applyLabels() {
    var cm = labelColormap();
    nv.volumes.forEach(function (vol, k) {
      if (cfg.volumes[k].role === "labels") { vol.setColormapLabel(cm); }
    });
    nv.updateGLVolume();
  }

  var sliceAxis = {axial: 2, coronal: 1, sagittal: 0, multiplanar: 2, render: 2};
  var view = "multiplanar";

  function dims() {
    var d = nv.volumes[0].dimsRAS;
    return [d[1], d[2], d[3]];
  }

  function syncSlider() {
    var axis = sliceAxis[view];
    var n = dims()[axis];
    var slider = byId("cv-slice");
    slider.max = String(n - 1);
    var idx = Math.min(n - 1, Math.max(0, Math.floor(nv.scene.crosshairPos[axis] * n)));
    slider.value = String(idx);
    byId("cv-slice-text").textContent = (idx + 1) + " / " + n;
  }

  function setSlice(idx) {
    var axis = sliceAxis[view];
    var n = dims()[axis];
    var pos = nv.scene.crosshairPos;
    pos[axis] = (Math.min(n - 1, Math.max(0, idx)) + 0.5) / n;
    nv.scene.crosshairPos = pos;
    nv.drawScene();
    nv.createOnLocationChange();
    syncSlider();
  }

  function setView(name) {
    view = name;
    var types = {axial: nv.sliceTypeAxial, coronal: nv.sliceTypeCoronal,
      sagittal: nv.sliceTypeSagittal, render: nv.sliceTypeRender, multiplanar: nv.sliceTypeMultiplanar};
    nv.setSliceType(types[name]);
    document.querySelectorAll("#cv-views button").forEach(function (b) {
      b.setAttribute("aria-pressed", b.getAttribute("data-view") === name ? "true" : "false");
    });
    byId("cv-slice-axis").textContent = {axial: "axial", coronal: "coronal", sagittal: "sagittal",
      multiplanar: "axial", render: "axial"}[name];
    syncSlider();
  }

  function syncWindow() {
    var img = nv.volumes[0];
    byId("cv-level").value = fmt((img.cal_min + img.cal_max) / 2);
    byId("cv-width").value = fmt(img.cal_max - img.cal_min);
  }

  function readout(data) {
    var parts = [];
    if (data && data.vox) { parts.push("voxel (" + Array.prototype.join.call(data.vox, ", ") + ")"); }
    if (data && data.mm) {
      parts.push(Array.prototype.slice.call(data.mm, 0, 3).map(function (v) { return v.toFixed(1); })
        .join(", ") + " mm");
    }
    (data && data.values || []).forEach(function (v, k) {
      var spec = cfg.volumes[k];
      if (!spec) { return; }
      var value = v.value;
      var text = spec.name + ": " + fmt(value);
      if (spec.role === "labels") {
        var idx = Math.round(value);
        text = spec.name + ": " + (labelNames[idx] !== undefined ? labelNames[idx] : idx);
      } else if (spec.role === "heat") {
        // maps are stored in steps of 1/63 and blank (0) under the value they are drawn from
        text = spec.name + ": " + (value === 0 && spec.cal_min > 0 ? "under " + spec.cal_min.toFixed(2)
          : value.toFixed(2));
      }
      parts.push(text);
    });
    byId("cv-readout").textContent = parts.join(" \u00b7 ");
    syncSlider();
  }

  function wire() {
    document.querySelectorAll("#cv-views button").forEach(function (b) {
      b.addEventListener("click", function () { setView(b.getAttribute("data-view")); });
    });
    byId("cv-slice").addEventListener("input", function (e) { setSlice(parseInt(e.target.value, 10)); });
    function applyWindow() {
      var level = parseFloat(byId("cv-level").value);
      var width = parseFloat(byId("cv-width").value);
      if (!isFinite(level) || !isFinite(width) || width <= 0) { return; }
      var img = nv.volumes[0];
      img.cal_min = level - width / 2;
      img.cal_max = level + width / 2;
      nv.updateGLVolume();
    }
    byId("cv-level").addEventListener("change", applyWindow);
    byId("cv-width").addEventListener("change", applyWindow);
    byId("cv-window-reset").addEventListener("click", function () {
      var img = nv.volumes[0];
      img.cal_min = cfg.volumes[0].cal_min;
      img.cal_max = cfg.volumes[0].cal_max;
      nv.updateGLVolume();
      syncWindow();
    });
    document.querySelectorAll("[data-layer]").forEach(function (el) {
      var k = parseInt(el.getAttribute("data-layer"), 10);
      el.addEventListener("input", function () {
        var on = byId("cv-layer-on-" + k).checked;
        var opacity = parseFloat(byId("cv-layer-opacity-" + k).value);
        nv.setOpacity(k, on ? opacity : 0);
      });
    });
    document.querySelectorAll("[data-label]").forEach(function (el) {
      var i = parseInt(el.getAttribute("data-label"), 10);
      el.addEventListener("input", function () {
        labelOn[i] = byId("cv-label-on-" + i).checked;
        labelAlpha[i] = parseFloat(byId("cv-label-opacity-" + i).value);
        applyLabels();
      });
    });
    nv.onLocationChange = readout;
    nv.onIntensityChange = syncWindow;
  }

  async function start() {
    root.setAttribute("data-state", "loading");
    await nv.attachToCanvas(canvas);
    for (var k = 0; k < cfg.volumes.length; k++) {
      var spec = cfg.volumes[k];
      var img = await window.niivue.NVImage.loadFromBase64({
        base64: spec.base64, name: "layer" + k + ".nii.gz", colormap: spec.colormap || "gray",
        opacity: spec.visible === false ? 0 : spec.opacity,
        cal_min: spec.cal_min, cal_max: spec.cal_max, trustCalMinMax: spec.cal_min !== undefined
      });
      nv.addVolume(img);
    }
    applyLabels();
    wire();
    setView("multiplanar");
    syncWindow();
    nv.createOnLocationChange();
    root.setAttribute("data-state", "ready");
    var box = byId("cv-status");
    if (box) { box.textContent = ""; }
  }

  start().catch(function (e) {
    if (window.console) { console.error(e && e.stack ? e.stack : e); }
    fail(String(e && e.message || e));
  });
}());
