// The operator console's only script: sign-in, navigation between server-rendered views,
// and the jobs view's live updates. The token stays in this tab (sessionStorage) and is
// sent only in the authorization header of same-origin requests.
"use strict";
(() => {
  const KEY = "adaptivenet.console.token";
  const FLEET = "adaptivenet.console.fleet";
  const VIEWS = ["overview", "devices", "supernets", "jobs", "rollouts"];
  const $ = (id) => document.getElementById(id);
  let token = sessionStorage.getItem(KEY);
  let stream = null;

  const auth = (t) => ({ headers: { authorization: "Bearer " + t }, cache: "no-store" });

  async function api(path) {
    const r = await fetch(path, auth(token));
    if (r.status === 401) {
      signOut("Your token is no longer accepted (expired or revoked). Sign in again.");
      throw new Error("signed out");
    }
    if (!r.ok) throw new Error((await r.text()).trim() || r.statusText);
    return r;
  }

  async function signIn(t) {
    let r;
    try {
      r = await fetch("/api/session", auth(t));
    } catch (e) {
      return "The console could not reach the server.";
    }
    if (r.status === 401) return "That token was not accepted: it is wrong, expired or revoked.";
    if (r.status === 403) return "That token may not read the dashboard: use a viewer, developer or admin token.";
    if (!r.ok) return "Sign-in failed: " + ((await r.text()).trim() || r.status);
    const s = await r.json();
    token = t;
    sessionStorage.setItem(KEY, t);
    showApp(s);
    return null;
  }

  function showApp(s) {
    $("sign-in").hidden = true;
    $("nav").hidden = false;
    $("session").hidden = false;
    $("view").hidden = false;
    $("sign-in-error").textContent = "";
    $("role").textContent = s.role + (s.fleet_scope ? " · one fleet" : "");
    const sel = $("fleet");
    sel.replaceChildren();
    if (!s.fleet_scope) sel.append(new Option("All fleets", ""));
    for (const f of s.fleets) sel.append(new Option(f.name, f.id));
    const saved = sessionStorage.getItem(FLEET);
    sel.value = [...sel.options].some((o) => o.value === saved) ? saved : sel.options[0].value;
    route();
  }

  function signOut(message) {
    token = null;
    sessionStorage.removeItem(KEY);
    stopStream();
    $("sign-in").hidden = false;
    $("nav").hidden = true;
    $("session").hidden = true;
    $("view").hidden = true;
    $("view").replaceChildren();
    $("sign-in-error").textContent = message || "";
    $("token").value = "";
    $("token").focus();
  }

  const current = () => {
    const h = location.hash.slice(1);
    return VIEWS.includes(h) ? h : "overview";
  };

  async function route() {
    if (!token) return;
    const v = current();
    for (const a of document.querySelectorAll("#nav a")) {
      if (a.hash === "#" + v) a.setAttribute("aria-current", "page");
      else a.removeAttribute("aria-current");
    }
    stopStream();
    const fleet = $("fleet").value;
    const view = $("view");
    view.setAttribute("aria-busy", "true");
    try {
      const q = fleet ? "?fleet=" + encodeURIComponent(fleet) : "";
      const html = await (await api("/api/views/" + v + q)).text();
      if (v !== current() || !token) return;
      // Server-rendered from aggregates, every value escaped there.
      view.innerHTML = html;
      view.dataset.view = v;
      const h = $("view-title");
      document.title = (h ? h.textContent + " · " : "") + "adaptivenet console";
      if (v === "jobs") startStream();
    } catch (e) {
      if (!token) return;
      const p = document.createElement("p");
      p.className = "error";
      p.setAttribute("role", "alert");
      p.textContent = "Could not load this view: " + e.message;
      view.replaceChildren(p);
    } finally {
      view.removeAttribute("aria-busy");
    }
  }

  function stopStream() {
    if (stream) stream.abort();
    stream = null;
  }

  // Server-sent events read with fetch, so the token goes in a header, not the URL.
  async function startStream() {
    const ctl = new AbortController();
    stream = ctl;
    try {
      const r = await fetch("/api/jobs/events", { ...auth(token), signal: ctl.signal });
      if (r.ok) {
        const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
        let buf = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buf += value;
          let i;
          while ((i = buf.indexOf("\n\n")) >= 0) {
            const block = buf.slice(0, i);
            buf = buf.slice(i + 2);
            const data = block
              .split("\n")
              .filter((l) => l.startsWith("data: "))
              .map((l) => l.slice(6))
              .join("\n");
            if (data) applyJob(JSON.parse(data));
          }
        }
      }
    } catch (e) {
      if (e.name === "AbortError") return;
    }
    // The stream ended (a server restart, say): reconnect while the jobs view is open.
    setTimeout(() => {
      if (stream === ctl && current() === "jobs") startStream();
    }, 3000);
  }

  let reloadPending = false;
  function applyJob(j) {
    const row = document.querySelector('tr[data-job-id="' + CSS.escape(j.id) + '"]');
    if (!row) {
      // A job started after the view was rendered: render the view again, once.
      if (!reloadPending) {
        reloadPending = true;
        setTimeout(() => {
          reloadPending = false;
          if (current() === "jobs") route();
        }, 500);
      }
      return;
    }
    const state = row.querySelector('[data-field="state"]');
    state.textContent = j.state;
    state.className = "js-" + j.state;
    row.querySelector('[data-field="stage"]').textContent = j.stage;
    row.querySelector("progress").value = j.progress;
    const p = row.querySelector('[data-field="progress"]');
    p.dataset.value = j.progress.toFixed(4);
    p.textContent = (100 * j.progress).toFixed(1) + " %";
    $("jobs-live").textContent = "Updated " + new Date().toLocaleTimeString() + ".";
  }

  $("sign-in-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const t = $("token").value.trim();
    if (!t) {
      $("sign-in-error").textContent = "Enter a token.";
      return;
    }
    $("sign-in-button").disabled = true;
    const err = await signIn(t);
    $("sign-in-button").disabled = false;
    if (err) {
      $("sign-in-error").textContent = err;
      $("token").select();
    }
  });
  $("sign-out").addEventListener("click", () => signOut("Signed out."));
  $("fleet").addEventListener("change", () => {
    sessionStorage.setItem(FLEET, $("fleet").value);
    route();
  });
  window.addEventListener("hashchange", route);
  if (token) {
    signIn(token).then((err) => {
      if (err) signOut(err);
    });
  } else {
    $("token").focus();
  }
})();
