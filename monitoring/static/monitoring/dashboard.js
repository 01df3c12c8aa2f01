// Charts of the monitoring pages. Figures arrive as strict JSON in <script type="application/json">
// blocks (json_script); the drift heatmaps load one feature's histograms on click.
(function () {
  "use strict";
  const config = { responsive: true, displaylogo: false };

  function embedded(id) {
    const el = document.getElementById(id);
    return el ? JSON.parse(el.textContent) : null;
  }

  for (const [name, fig] of Object.entries(embedded("figures") || {})) {
    const el = document.getElementById("fig-" + name);
    if (el) Plotly.newPlot(el, fig.data, fig.layout, config);
  }

  const panel = document.getElementById("drift-histogram");
  const status = document.getElementById("drift-histogram-status");
  const template = panel ? panel.dataset.urlTemplate : "";

  function histogramUrl(rollupId, feature) {
    return template
      .replace("/0/", "/" + encodeURIComponent(rollupId) + "/")
      .replace("__feature__", encodeURIComponent(feature));
  }

  async function showHistogram(url) {
    status.textContent = "Loading…";
    let response;
    try {
      response = await fetch(url, { headers: { Accept: "application/json" }, credentials: "same-origin" });
    } catch (err) {
      status.textContent = "Could not load the histograms: " + err;
      return;
    }
    if (!response.ok) {
      Plotly.purge(panel);
      status.textContent = response.status === 404
        ? "No histogram of this feature in this window (insufficient data)."
        : "Could not load the histograms (HTTP " + response.status + ").";
      return;
    }
    const body = await response.json();
    status.textContent = body.summary;
    panel.dataset.feature = body.feature;
    await Plotly.react(panel, body.figure.data, body.figure.layout, config);
    panel.scrollIntoView({ block: "nearest" });
  }

  (embedded("drift-heatmaps") || []).forEach(function (fig, i) {
    const el = document.getElementById("fig-drift-" + i);
    if (!el) return;
    Plotly.newPlot(el, fig.data, fig.layout, config).then(function () {
      el.on("plotly_click", function (event) {
        const point = event.points && event.points[0];
        if (!point || point.customdata == null) return;
        showHistogram(histogramUrl(point.customdata, point.y));
      });
    });
  });

  const initial = embedded("drift-initial");
  if (initial && panel) showHistogram(initial.url);
})();
