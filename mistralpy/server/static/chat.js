"use strict";
// The chat page: plain DOM, no build step, no network access but this server.
// Model text is never parsed as HTML: the Markdown renderer builds DOM nodes and puts all
// text in with textContent, so an answer cannot inject markup or script (XSS-safe).
(function () {
  const $ = (id) => document.getElementById(id);
  const KEY_STORAGE = "mistralpy.apiKey"; // sessionStorage: the key leaves with the tab
  const state = { history: [], images: [], controller: null, pending: null };

  // --- Markdown → DOM -------------------------------------------------------------------

  function el(tag, text) {
    const node = document.createElement(tag);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function safeHref(url) {
    // only links that cannot run script; anything else stays plain text
    return /^(https?:\/\/|mailto:)/i.test(url) ? url : null;
  }

  const INLINE = /(`+)([\s\S]*?)\1|\*\*([^*]+)\*\*|__([^_]+)__|\*([^*\s][^*]*)\*|_([^_\s][^_]*)_|\[([^\]]+)\]\(([^)\s]+)\)/;

  function appendInline(parent, text) {
    while (text) {
      const m = INLINE.exec(text);
      if (!m) { parent.append(text); return; }
      if (m.index > 0) parent.append(text.slice(0, m.index));
      if (m[1]) parent.append(el("code", m[2]));
      else if (m[3] || m[4]) appendInline(parent.appendChild(el("strong")), m[3] || m[4]);
      else if (m[5] || m[6]) appendInline(parent.appendChild(el("em")), m[5] || m[6]);
      else {
        const href = safeHref(m[8]);
        if (href) {
          const a = parent.appendChild(el("a"));
          a.href = href; a.rel = "noopener noreferrer"; a.target = "_blank";
          appendInline(a, m[7]);
        } else parent.append(m[0]);
      }
      text = text.slice(m.index + m[0].length);
    }
  }

  function appendLines(parent, lines) {
    lines.forEach((line, i) => {
      if (i) parent.append(el("br"));
      appendInline(parent, line);
    });
  }

  const LIST_ITEM = /^\s*([-*+]|\d+[.)])\s+(.*)$/;

  function renderMarkdown(source) {
    const root = el("div");
    const lines = source.replace(/\r\n?/g, "\n").split("\n");
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      const fence = /^\s*(```+|~~~+)\s*([\w+-]*)/.exec(line);
      if (fence) {
        const body = [];
        for (i++; i < lines.length && !lines[i].trim().startsWith(fence[1]); i++) body.push(lines[i]);
        i++; // the closing fence (or the end of a still-streaming block)
        const code = el("code", body.join("\n"));
        if (fence[2]) code.className = "language-" + fence[2];
        root.appendChild(el("pre")).appendChild(code);
        continue;
      }
      const heading = /^(#{1,6})\s+(.*)$/.exec(line);
      if (heading) {
        appendInline(root.appendChild(el("h" + Math.min(heading[1].length + 2, 6))), heading[2]);
        i++;
        continue;
      }
      if (LIST_ITEM.test(line)) {
        const ordered = /^\s*\d/.test(line);
        const list = root.appendChild(el(ordered ? "ol" : "ul"));
        for (; i < lines.length && LIST_ITEM.test(lines[i]); i++) {
          appendInline(list.appendChild(el("li")), LIST_ITEM.exec(lines[i])[2]);
        }
        continue;
      }
      if (/^\s*>/.test(line)) {
        const quote = [];
        for (; i < lines.length && /^\s*>/.test(lines[i]); i++) quote.push(lines[i].replace(/^\s*>\s?/, ""));
        appendLines(root.appendChild(el("blockquote")), quote);
        continue;
      }
      if (!line.trim()) { i++; continue; }
      const para = [];
      for (; i < lines.length && lines[i].trim() && !isBlockStart(lines[i]); i++) para.push(lines[i]);
      appendLines(root.appendChild(el("p")), para);
    }
    return root;
  }

  function isBlockStart(line) {
    return /^\s*(```|~~~|#{1,6}\s|>)/.test(line) || LIST_ITEM.test(line);
  }

  // --- rendering the conversation --------------------------------------------------------

  function addBubble(role) {
    const div = el("div");
    div.className = "msg " + role;
    $("messages").appendChild(div);
    return div;
  }

  function showUser(text, images) {
    const div = addBubble("user");
    div.append(text);
    for (const url of images) {
      if (url.startsWith("data:")) {
        const img = div.appendChild(el("img"));
        img.src = url; img.alt = "attached image";
      } else div.appendChild(el("div", "image: " + url)).className = "note";
    }
  }

  function showAssistant(div, text, calls, note) {
    div.replaceChildren(renderMarkdown(text));
    for (const call of calls) {
      const box = div.appendChild(el("div"));
      box.className = "tool-call";
      box.appendChild(el("strong", "tool call: " + call.name));
      box.appendChild(el("pre")).appendChild(el("code", prettyJson(call.arguments)));
    }
    if (note) div.appendChild(el("div", note)).className = "note";
    $("messages").scrollTop = $("messages").scrollHeight;
  }

  function prettyJson(text) {
    try { return JSON.stringify(JSON.parse(text), null, 2); } catch (_) { return text; }
  }

  function showError(message) {
    $("error").textContent = message || "";
    $("error").hidden = !message;
  }

  // --- attachments -------------------------------------------------------------------------

  function addImage(url) {
    state.images.push(url);
    renderAttachments();
  }

  function renderAttachments() {
    const box = $("attachments");
    box.replaceChildren();
    state.images.forEach((url, k) => {
      const chip = box.appendChild(el("span"));
      chip.className = "chip";
      if (url.startsWith("data:")) {
        const img = chip.appendChild(el("img"));
        img.src = url; img.alt = "attachment " + (k + 1);
      } else chip.append(url);
      const remove = chip.appendChild(el("button", "×"));
      remove.type = "button";
      remove.title = "remove";
      remove.onclick = () => { state.images.splice(k, 1); renderAttachments(); };
    });
  }

  function readFiles(files) {
    for (const file of files) {
      if (!file.type.startsWith("image/")) continue;
      const reader = new FileReader();
      reader.onload = () => addImage(reader.result);
      reader.readAsDataURL(file);
    }
  }

  // --- requests ----------------------------------------------------------------------------

  function headers() {
    const h = { "Content-Type": "application/json" };
    const key = sessionStorage.getItem(KEY_STORAGE);
    if (key) h.Authorization = "Bearer " + key;
    return h;
  }

  function askForKey(retry) {
    state.pending = retry;
    $("key-form").hidden = false;
    showError("This server needs an API key.");
    $("api-key").focus();
  }

  function numberOf(id) {
    const value = parseFloat($(id).value);
    return Number.isFinite(value) ? value : undefined;
  }

  function requestBody() {
    const system = $("system").value.trim();
    const messages = system ? [{ role: "system", content: system }] : [];
    const body = {
      messages: messages.concat(state.history),
      stream: true,
      stream_options: { include_usage: true },
      temperature: numberOf("temperature"),
      top_p: numberOf("top-p"),
      max_tokens: numberOf("max-tokens"),
    };
    const tools = $("tools").value.trim();
    if (tools) body.tools = JSON.parse(tools); // a typo is reported before sending
    return body;
  }

  async function loadModel() {
    const res = await fetch("/v1/models", { headers: headers() });
    if (res.status === 401) return askForKey(loadModel);
    if (res.ok) $("model-name").textContent = (await res.json()).data[0].id;
  }

  // SSE: events are separated by a blank line; each `data:` line holds one JSON chunk.
  async function* sseChunks(response) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") return;
          yield JSON.parse(data);
        }
      }
    }
  }

  function applyChunk(reply, chunk) {
    if (chunk.error) throw new Error(chunk.error.message);
    if (chunk.usage) reply.usage = chunk.usage;
    const delta = (chunk.choices && chunk.choices[0] && chunk.choices[0].delta) || {};
    if (delta.content) {
      reply.text += delta.content;
      reply.pieces += 1;
      reply.firstAt = reply.firstAt || performance.now();
    }
    for (const d of delta.tool_calls || []) {
      const call = (reply.calls[d.index] = reply.calls[d.index] || { id: d.id, name: "", arguments: "" });
      if (d.function && d.function.name) call.name = d.function.name;
      if (d.function && d.function.arguments) call.arguments += d.function.arguments;
      reply.firstAt = reply.firstAt || performance.now();
    }
  }

  function showSpeed(reply) {
    if (!reply.firstAt) return;
    const tokens = reply.usage ? reply.usage.completion_tokens : reply.pieces;
    const seconds = (performance.now() - reply.firstAt) / 1000;
    const rate = seconds > 0 ? (tokens / seconds).toFixed(1) : "–";
    $("speed").textContent = tokens + " tokens · " + rate + " tok/s";
  }

  function setBusy(busy) {
    $("send").disabled = busy;
    $("stop").hidden = !busy;
  }

  async function send() {
    const text = $("prompt").value.trim();
    if (!text && !state.images.length) return;
    let body;
    try { body = requestBody(); } catch (e) { return showError("Tools: not valid JSON (" + e.message + ")"); }
    const images = state.images.splice(0);
    renderAttachments();
    $("prompt").value = "";
    const content = images.length
      ? [{ type: "text", text }].concat(images.map((url) => ({ type: "image_url", image_url: { url } })))
      : text;
    state.history.push({ role: "user", content });
    body.messages.push({ role: "user", content });
    showUser(text, images);
    await stream(body);
  }

  async function stream(body) {
    showError("");
    const div = addBubble("assistant streaming");
    const reply = { text: "", calls: [], pieces: 0, usage: null, firstAt: 0 };
    const controller = (state.controller = new AbortController());
    setBusy(true);
    let note = "";
    let frame = 0;
    const paint = () => { frame = 0; showAssistant(div, reply.text, reply.calls.filter(Boolean), note); showSpeed(reply); };
    try {
      const res = await fetch("/v1/chat/completions", {
        method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
      });
      if (res.status === 401) { div.remove(); return askForKey(() => stream(body)); }
      if (!res.ok) {
        const err = await res.json().catch(() => ({}));
        throw new Error((err.error && err.error.message) || "HTTP " + res.status);
      }
      for await (const chunk of sseChunks(res)) {
        applyChunk(reply, chunk);
        if (!frame) frame = requestAnimationFrame(paint); // one repaint per frame
      }
    } catch (e) {
      if (e.name === "AbortError") note = "[stopped]";
      else { div.classList.add("error"); note = "Error: " + e.message; }
    } finally {
      state.controller = null;
      setBusy(false);
      if (frame) cancelAnimationFrame(frame);
      div.classList.remove("streaming");
      paint();
      remember(reply);
    }
  }

  function remember(reply) {
    const calls = reply.calls.filter(Boolean);
    if (!reply.text && !calls.length) return;
    const message = { role: "assistant", content: reply.text || null };
    if (calls.length) {
      message.tool_calls = calls.map((c) => ({
        id: c.id, type: "function", function: { name: c.name, arguments: c.arguments || "{}" },
      }));
    }
    state.history.push(message);
  }

  // --- wiring ------------------------------------------------------------------------------

  $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
  });
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("file").addEventListener("change", (e) => { readFiles(e.target.files); e.target.value = ""; });
  $("add-url").addEventListener("click", () => {
    const url = $("image-url").value.trim();
    if (url) { addImage(url); $("image-url").value = ""; }
  });
  document.addEventListener("paste", (e) => readFiles(e.clipboardData ? e.clipboardData.files : []));
  document.addEventListener("dragover", (e) => e.preventDefault());
  document.addEventListener("drop", (e) => { e.preventDefault(); readFiles(e.dataTransfer.files); });
  $("new-chat").addEventListener("click", () => {
    state.history = [];
    $("messages").replaceChildren();
    $("speed").textContent = "";
  });
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
    $("key-form").hidden = true;
    showError("");
    const retry = state.pending;
    state.pending = null;
    if (retry) retry();
  });

  window.mistralpyChat = { renderMarkdown }; // for tests and the console
  loadModel();
})();
