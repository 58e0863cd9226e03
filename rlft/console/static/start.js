/* rlft console, boot: fetch the server's settings, then route on every hash change. */
"use strict";

(async function start() {
  try {
    RL.info = await RL.api("/api/info");
  } catch (e) {
    RL.info = { poll_ms: 2000, terminations: {}, metric_keys: [], store_exists: false };
    document.getElementById("view").appendChild(RL.errorBox("Cannot reach the console server: " + e.message));
  }
  window.addEventListener("hashchange", RL.route);
  await RL.route();
  document.body.dataset.ready = "1";
})();
