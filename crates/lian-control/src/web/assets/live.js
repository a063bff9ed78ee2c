// Live pages: listen to /events (server-sent events from the control plane, which alone
// reads NATS) and redraw <main> from the server when something changed. One refresh at a
// time; changes arriving meanwhile cause one more.
(function () {
  "use strict";
  var main = document.querySelector("main[data-live]");
  var status = document.getElementById("live-status");
  if (!main || !window.EventSource || !window.fetch) return;
  var kind = main.getAttribute("data-live");
  var buildId = kind === "build" ? decodeURIComponent(location.pathname.split("/").pop()) : null;
  var busy = false;
  var again = false;

  function say(text) { if (status) status.textContent = text; }

  function refresh() {
    if (busy) { again = true; return; }
    busy = true;
    again = false;
    fetch(location.href, { headers: { "X-Lian-Fragment": "main" }, credentials: "same-origin" })
      .then(function (r) {
        if (r.status === 401) { location.reload(); return null; }
        return r.ok ? r.text() : null;
      })
      .then(function (html) { if (html !== null && html !== undefined) main.innerHTML = html; })
      .catch(function () { say("offline"); })
      .then(function () {
        busy = false;
        if (again) refresh();
      });
  }

  var source = new EventSource("/events");
  source.addEventListener("change", function (e) {
    if (buildId) {
      var change = {};
      try { change = JSON.parse(e.data); } catch (_) { /* redraw anyway */ }
      if (change.build && change.build !== buildId) return;
    }
    refresh();
  });
  source.addEventListener("resync", refresh);
  source.onopen = function () { say("live"); refresh(); };
  source.onerror = function () { say("reconnecting…"); };
})();
