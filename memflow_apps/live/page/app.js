// memflow live: plays the video chunk by chunk as the server makes it, sends prompts and
// commands, and shows the prompt timeline and what the memory held for the chunk on screen.
// Text from the server or the user is shown with textContent only (never parsed as HTML).
"use strict";

const $ = (id) => document.getElementById(id);
const SEGMENT_COLOURS = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948",
                         "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"];

// What the page knows; window.memflow exposes it to tests and to bench/live_latency.py.
const live = {
  hello: null,
  generation: 0,       // the stream the server is making (a restart makes a new one)
  numChunks: 0,
  schedule: [],        // [[prompt, first latent frame], ...] as it stands
  pending: null,       // a prompt sent and not applied yet
  applied: [],         // {prompt, chunk} of every prompt applied, in order
  chunks: [],          // the headers of the chunks received, by index
  current: null,       // the header of the chunk on screen
  thumbs: new Map(),   // latent frame -> object URL of the video frame that shows it
  saved: null,         // the files of the last save
  offsetMs: null,      // server clock - page clock, from the ping with the shortest round trip
  bestRttMs: Infinity,
  stats: { chunksShown: 0, framesShown: 0, latenciesMs: [], firstFrameAt: null,
           lastFrameAt: null, fps: null },
};
window.memflow = live;

const socket = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`);
socket.binaryType = "blob";
const send = (command) => socket.readyState === WebSocket.OPEN && socket.send(JSON.stringify(command));

function status(text, error = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", error);
}

// --------------------------------------------------------------------------- clock calibration
// The server stamps each chunk with its clock when the chunk's last frame was decoded; a few
// pings give the offset to the page's clock (both on one machine, or across an SSH tunnel).
function ping() { send({ type: "ping", t: performance.now() }); }
function onPong(message) {
  const now = performance.now();
  const rtt = now - message.t;
  if (rtt < live.bestRttMs) {
    live.bestRttMs = rtt;
    live.offsetMs = message.server_t * 1000 - (message.t + now) / 2;
  }
}

// ------------------------------------------------------------------------------- frames in
let receiving = null;                 // {header, count}: the chunk whose frames are arriving
let decoding = Promise.resolve();     // decoded in arrival order
const queue = [];                     // {bitmap, header, index, generation} to draw

function onChunk(header) {
  header.generation = live.generation;
  live.chunks[header.index] = header;
  receiving = { header, count: 0 };
  const cell = $("chunks").children[header.index];
  if (cell) cell.classList.add("made");
}

function onFrame(data) {
  if (!receiving) return;
  const { header } = receiving;
  const index = receiving.count++;
  const blob = new Blob([data], { type: header.mime });
  const pixel = header.first_pixel + index;
  header.latent_pixels.forEach((shows, k) => {
    if (shows === pixel) live.thumbs.set(header.start_frame + k, URL.createObjectURL(blob));
  });
  if (receiving.count === header.num_pixels) receiving = null;
  decoding = decoding
    .then(() => createImageBitmap(blob))
    .then((bitmap) => queue.push({ bitmap, header, index, generation: header.generation }))
    .catch((error) => status(`a frame could not be decoded: ${error}`, true));
}

// ------------------------------------------------------------------------------- playback
let nextDue = 0;
let justShown = null;                 // the header whose last frame was drawn last animation frame
const canvas = $("video");
const context = canvas.getContext("2d");

function play(now) {
  requestAnimationFrame(play);
  if (justShown) {                    // drawn in the previous frame: on screen now
    chunkShown(justShown, now);
    justShown = null;
  }
  if (!live.hello || !queue.length || now < nextDue) return;
  const item = queue.shift();
  if (item.generation !== live.generation) { item.bitmap.close(); return; }
  const interval = 1000 / live.hello.fps;
  nextDue = (now - nextDue > interval ? now : nextDue) + interval;  // after a wait: from now
  if (canvas.width !== item.bitmap.width || canvas.height !== item.bitmap.height) {
    canvas.width = item.bitmap.width;
    canvas.height = item.bitmap.height;
  }
  context.drawImage(item.bitmap, 0, 0);
  item.bitmap.close();
  const stats = live.stats;
  stats.framesShown += 1;
  if (stats.firstFrameAt === null) stats.firstFrameAt = now;
  stats.lastFrameAt = now;
  if (stats.framesShown > 1) {
    stats.fps = (stats.framesShown - 1) * 1000 / (stats.lastFrameAt - stats.firstFrameAt);
  }
  if (item.index === 0) showChunk(item.header);
  if (item.index === item.header.num_pixels - 1) justShown = item.header;
}
requestAnimationFrame(play);

function chunkShown(header, now) {
  const stats = live.stats;
  stats.chunksShown += 1;
  let latency = null;
  if (live.offsetMs !== null) {
    latency = now - (header.decoded_at * 1000 - live.offsetMs);
    stats.latenciesMs.push(latency);
  }
  send({ type: "shown", chunk: header.index, generation: header.generation });
  const total = header.seconds + header.decode_seconds;
  $("stats").textContent =
    `chunk ${header.index + 1}/${live.numChunks} · ${(total * 1000).toFixed(0)} ms to make` +
    ` · ${stats.fps === null ? "–" : stats.fps.toFixed(1)} FPS shown` +
    (latency === null ? "" : ` · ${latency.toFixed(0)} ms from decoded to shown`);
}

// ------------------------------------------------------------------------------- the panels
function showChunk(header) {
  live.current = header;
  for (const cell of $("chunks").querySelectorAll(".current")) cell.classList.remove("current");
  const cell = $("chunks").children[header.index];
  if (cell) {
    cell.classList.add("shown", "current");
    cell.classList.toggle("recached", header.recached);
    cell.style.background = segmentColour(header.start_frame);
    cell.title = `chunk ${header.index}: ${header.prompt}${header.recached ? " (recached)" : ""}`;
  }
  updateLayers(header);
  showMemory();
}

function segmentColour(frame) {
  let segment = 0;
  live.schedule.forEach(([, start], i) => { if (start <= frame) segment = i; });
  return SEGMENT_COLOURS[segment % SEGMENT_COLOURS.length];
}

function updateLayers(header) {
  const select = $("layer");
  const layers = [...new Set([...Object.keys(header.memory.bank),
                              ...Object.keys(header.memory.activated)])]
    .map(Number).sort((a, b) => a - b);
  if (layers.length === select.options.length) return;
  const chosen = select.value;
  select.replaceChildren(...layers.map((layer) => new Option(`${layer}`, `${layer}`)));
  select.disabled = layers.length === 0;
  if (layers.length) select.value = layers.map(String).includes(chosen) ? chosen : `${layers[0]}`;
}

function showMemory() {
  const header = live.current;
  if (!header) return;
  const layer = $("layer").value;
  const memory = header.memory;
  const activated = memory.activated[layer];
  const active = new Set(activated || []);
  $("memory-chunk").textContent =
    `of chunk ${header.index} (latent frames ${header.start_frame}–` +
    `${header.start_frame + header.num_frames - 1})`;
  $("sma").textContent = activated === undefined
    ? "SMA off: every sink and bank frame is attended to"
    : `SMA activated (red): frames ${activated.join(", ") || "none"}`;
  $("sink").replaceChildren(...memory.sink.map((frame) => thumbnail(frame, active)));
  $("bank").replaceChildren(...(memory.bank[layer] || []).map((frame) => thumbnail(frame, active)));
}

function thumbnail(frame, active) {
  const figure = document.createElement("figure");
  figure.dataset.frame = `${frame}`;
  figure.classList.toggle("activated", active.has(frame));
  const image = document.createElement("img");
  image.alt = `latent frame ${frame}`;
  const url = live.thumbs.get(frame);
  if (url) image.src = url;
  const caption = document.createElement("figcaption");
  caption.textContent = `${frame}`;
  figure.append(image, caption);
  return figure;
}

function showTimeline() {
  const perChunk = live.hello.frames_per_chunk;
  const items = live.schedule.map(([prompt, frame]) => {
    const item = document.createElement("li");
    item.textContent = `chunk ${Math.floor(frame / perChunk)} (frame ${frame}): ${prompt}`;
    return item;
  });
  if (live.pending !== null) {
    const item = document.createElement("li");
    item.className = "pending";
    item.textContent = `next chunk: ${live.pending}`;
    items.push(item);
  }
  $("prompts").replaceChildren(...items);
}

function onStarted(message) {
  live.generation = message.generation;
  live.numChunks = message.num_chunks;
  live.schedule = message.schedule;
  live.pending = null;
  live.applied = [];
  live.chunks = [];
  live.current = null;
  for (const url of live.thumbs.values()) URL.revokeObjectURL(url);
  live.thumbs.clear();
  live.stats = { chunksShown: 0, framesShown: 0, latenciesMs: [], firstFrameAt: null,
                 lastFrameAt: null, fps: null };
  queue.length = 0;
  receiving = null;
  $("seed").value = `${message.seed}`;
  $("chunks").replaceChildren(...Array.from({ length: message.num_chunks }, () =>
    document.createElement("span")));
  $("sink").replaceChildren();
  $("bank").replaceChildren();
  showTimeline();
  status(`streaming with seed ${message.seed}`);
}

// ------------------------------------------------------------------------------- messages
const handlers = {
  hello(message) {
    live.hello = message;
    $("info").textContent = `${message.model} · memory: ${message.memory} · ` +
      `${message.width}×${message.height}, ${message.fps} fps`;
    $("prompt").maxLength = message.max_prompt_chars;
    $("seed").value = `${message.seed}`;
    $("suggestions").replaceChildren(...message.suggestions.map((text) => new Option(text)));
  },
  started: onStarted,
  chunk: onChunk,
  applied(message) {
    live.schedule = message.schedule;
    if (live.pending === message.prompt) live.pending = null;
    live.applied.push({ prompt: message.prompt, chunk: message.chunk });
    showTimeline();
  },
  pending(message) {
    live.pending = message.prompt;
    showTimeline();
  },
  state(message) {
    $("pause").textContent = message.paused ? "Resume" : "Pause";
    status(message.paused ? "paused (the chunks made play out)" : "streaming");
  },
  saving() { status("saving at the next chunk boundary…"); },
  saved(message) {
    live.saved = message.files;
    status(`saved in ${message.folder}`);
    $("saved").replaceChildren(...Object.entries(message.files).map(([name, path]) => {
      const item = document.createElement("li");
      item.textContent = `${name}: ${path}`;
      return item;
    }));
  },
  done() { status("the video is complete: restart with a seed, or save it"); },
  pong: onPong,
  busy(message) {
    status(message.message, true);
    for (const control of document.querySelectorAll("button, input")) control.disabled = true;
  },
  error(message) { status(message.message, true); },
};

socket.addEventListener("open", () => {
  for (let i = 0; i < 5; i += 1) setTimeout(ping, i * 50);
  setInterval(ping, 2000);
});
socket.addEventListener("message", (event) => {
  if (typeof event.data !== "string") { onFrame(event.data); return; }
  const message = JSON.parse(event.data);
  const handler = handlers[message.type];
  if (handler) handler(message);
});
socket.addEventListener("close", () => status("disconnected from the server (reload to start again)", true));

$("prompt-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (text) send({ type: "prompt", text });
  $("prompt").value = "";
});
$("pause").addEventListener("click", () =>
  send({ type: $("pause").textContent === "Pause" ? "pause" : "resume" }));
$("restart").addEventListener("click", () => {
  const seed = Number.parseInt($("seed").value, 10);
  if (Number.isInteger(seed) && seed >= 0) send({ type: "restart", seed });
  else status("the seed must be an integer >= 0", true);
});
$("save").addEventListener("click", () => send({ type: "save" }));
$("layer").addEventListener("change", showMemory);
