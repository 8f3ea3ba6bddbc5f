// The live captions page: Start/Stop, status line, captions. See README.md for URL parameters.

import { Captions } from "./captions.js";
import { MicCapture, MicError } from "./mic.js";
import { StreamClient } from "./stream-client.js";

const SAMPLE_RATE_HZ = 16000; // what pcm-worklet.js produces
const CHUNK_MS = 40;
// Relative, so that a daemon behind a reverse proxy under a path prefix works unchanged.
const STREAM_PATH = "v1/stream";
const LEVEL_FLOOR_DB = -60; // the level meter's zero

const params = new URLSearchParams(window.location.search);
const settings = {
  token: params.get("token") || null,
  language: params.get("language")?.trim() || null,
  autostart: ["1", "true", "yes"].includes((params.get("autostart") ?? "").toLowerCase()),
  levelOffsetDb: levelOffset(params.get("level_offset_db")),
};

// A number goes to `start` as a number; anything else goes as it is, so that the daemon refuses
// it and the page shows why (rather than dropping a typo silently).
function levelOffset(value) {
  if (value === null) return undefined;
  const number = Number(value);
  return value.trim() !== "" && Number.isFinite(number) ? number : value;
}

const ui = {
  body: document.body,
  button: document.getElementById("toggle"),
  status: document.getElementById("status"),
  level: document.getElementById("level"),
  details: document.getElementById("details"),
  captions: new Captions(document.getElementById("captions")),
};

let run = null; // {client, mic, stopping} while a stream is on
let shownSession = null;
let stopNote = null; // why the stream stopped, when the user did not press Stop

function streamUrl() {
  const url = new URL(STREAM_PATH, window.location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  url.search = "";
  url.hash = "";
  // browsers cannot set an Authorization header on a websocket: the query is the way
  if (settings.token) url.searchParams.set("token", settings.token);
  return url.href;
}

async function start() {
  if (run) return;
  const client = new StreamClient({
    url: streamUrl(),
    start: {
      sample_rate: SAMPLE_RATE_HZ,
      encoding: "pcm_s16le",
      channels: 1,
      language: settings.language,
      level_offset_db: settings.levelOffsetDb, // left out of the JSON when undefined
    },
    onMessage: showMessage,
    onState: showState,
  });
  const mic = new MicCapture({
    chunkMs: CHUNK_MS,
    onChunk: (pcm) => {
      showLevel(pcm);
      client.sendAudio(pcm);
    },
    onEnded: () => stop("Stopped: the microphone was disconnected."),
  });
  const current = { client, mic, stopping: false };
  window.streamdClient = client; // for automation and debugging (tests read its counters)
  run = current;
  stopNote = null;
  setView("connecting", "Opening the microphone…");
  try {
    await mic.start();
  } catch (err) {
    if (run === current) run = null;
    const message = err instanceof MicError ? err.message : `Could not start: ${err}`;
    setView(err?.needsGesture ? "idle" : "error", message);
    return;
  }
  if (run !== current) {
    await mic.close(); // Stop was pressed while the permission prompt was up
    return;
  }
  ui.details.dataset.inputRate = String(mic.inputRateHz);
  client.connect();
}

async function stop(note = null) {
  if (!run || run.stopping) return;
  run.stopping = true;
  stopNote = note;
  const { client, mic } = run;
  // the worklet's last partial chunk must reach the client before `end` goes out
  await client.stop(mic.stop());
}

function showMessage(message) {
  const captions = ui.captions;
  switch (message.type) {
    case "ready":
      if (message.session !== shownSession) {
        captions.newSession();
        shownSession = message.session;
      } else {
        captions.clearPartial(); // its words come back as finals of the resumed session
      }
      ui.details.textContent =
        `Session ${message.session} · model ${message.model} · ` +
        `microphone ${ui.details.dataset.inputRate / 1000} kHz → ${SAMPLE_RATE_HZ / 1000} kHz`;
      break;
    case "speech_started":
      captions.speechStarted(message.t);
      break;
    case "partial":
      captions.showPartial(message);
      break;
    case "final":
      captions.addFinal(message);
      break;
  }
}

function showState(state, info) {
  setView(state, describe(state, info));
  // for tests and the curious: how much audio a reconnect had to send again
  document.body.dataset.resentMs = String(Math.round(info.resentMs));
  if ((state === "closed" || state === "error") && run) {
    run.mic.close();
    run = null;
    ui.level.value = 0;
  }
}

function describe(state, info) {
  const lost =
    info.droppedMs >= 1000
      ? ` ${Math.round(info.droppedMs / 1000)} s of audio could not be sent while offline.`
      : "";
  switch (state) {
    case "connecting":
      if (!info.retry) return "Connecting…";
      return `Cannot reach the server: ${info.retry.reason}. Retrying in ${wait(info.retry)}…`;
    case "listening":
      if (info.notice) {
        return `Listening. The server says: ${info.notice.message} [${info.notice.code}]`;
      }
      return (info.resumed ? "Listening (reconnected)." : "Listening.") + lost;
    case "reconnecting":
      return (
        `Reconnecting in ${wait(info.retry)} (attempt ${info.retry.attempt}): ` +
        `${info.retry.reason}.`
      );
    case "stopping":
      return "Stopping: waiting for the last words…";
    case "closed":
      if (info.timedOut) return "Stopped (the server did not confirm the last words).";
      return (stopNote ?? "Stopped.") + lost;
    case "error":
      return describeError(info.error);
    default:
      return "";
  }
}

function describeError(error) {
  if (error.code === "unauthorized") {
    return (
      `Not authorized: ${error.message} [unauthorized]. ` +
      "Open this page with ?token=<the daemon's token>."
    );
  }
  return `The server refused the stream: ${error.message} [${error.code}]`;
}

function wait(retry) {
  return retry.delayMs < 1000 ? "a moment" : `${(retry.delayMs / 1000).toFixed(0)} s`;
}

function setView(state, text) {
  ui.body.dataset.state = state;
  ui.status.textContent = text;
  const on = state === "connecting" || state === "listening" || state === "reconnecting";
  ui.button.textContent = state === "stopping" ? "Stopping…" : on ? "Stop" : "Start";
  ui.button.disabled = state === "stopping";
}

function showLevel(pcm) {
  const view = new DataView(pcm);
  const count = pcm.byteLength / 2;
  let sum = 0;
  for (let i = 0; i < count; i++) sum += view.getInt16(2 * i, true) ** 2;
  const rms = Math.sqrt(sum / Math.max(count, 1)) / 32768;
  const db = 20 * Math.log10(Math.max(rms, 1e-6));
  ui.level.value = Math.max(0, 1 - db / LEVEL_FLOOR_DB);
}

ui.button.addEventListener("click", () => (run ? stop() : start()));
if (settings.autostart) start();
