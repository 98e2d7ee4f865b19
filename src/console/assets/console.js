// The console's only script: the environment switcher submits on change, forms marked
// data-confirm ask first, and a section marked data-refresh reloads its content from the
// URL it names every data-every milliseconds. Everything it inserts was rendered (and
// escaped) by the server.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  for (const select of document.querySelectorAll("select[data-autosubmit]")) {
    select.addEventListener("change", () => select.form.submit());
  }
  for (const form of document.querySelectorAll("form[data-confirm]")) {
    form.addEventListener("submit", (e) => {
      if (!window.confirm(form.dataset.confirm)) e.preventDefault();
    });
  }
  for (const section of document.querySelectorAll("[data-refresh]")) {
    const every = Number(section.dataset.every) || 5000;
    const refresh = async () => {
      try {
        const r = await fetch(section.dataset.refresh, { credentials: "same-origin" });
        if (r.ok) section.innerHTML = await r.text();
      } catch (_) { /* the next tick tries again */ }
      setTimeout(refresh, every);
    };
    setTimeout(refresh, every);
  }
});
