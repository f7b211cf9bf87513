// The dashboard works without this file: it only refreshes, in place, the parts of a page marked
// data-refresh="SECONDS" (a wave's bars, the device counts) by fetching the same page again and swapping each
// marked element for its namesake (by id) in the new copy. Served from the binary: no CDN, fleets are offline.
"use strict";
(function () {
  var parts = document.querySelectorAll("[data-refresh][id]");
  if (parts.length === 0) return;
  var every = 5;
  parts.forEach(function (p) {
    var s = parseInt(p.getAttribute("data-refresh"), 10);
    if (s > 0 && s < every) every = s;
  });
  function refresh() {
    fetch(window.location.href, { credentials: "same-origin", headers: { "X-Refresh": "1" } })
      .then(function (r) {
        // Signed out meanwhile: leave the page as it is; the next click goes to sign-in.
        if (!r.ok || r.redirected) throw new Error("status " + r.status);
        return r.text();
      })
      .then(function (html) {
        var fresh = new DOMParser().parseFromString(html, "text/html");
        document.querySelectorAll("[data-refresh][id]").forEach(function (old) {
          var next = fresh.getElementById(old.id);
          if (next) old.replaceWith(document.importNode(next, true));
        });
      })
      .catch(function () {})
      .then(function () { window.setTimeout(refresh, every * 1000); });
  }
  window.setTimeout(refresh, every * 1000);
})();
