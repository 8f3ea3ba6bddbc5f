// StreamClient: one captions stream over /v1/stream (protocol v1, docs/protocol.md), kept going
// across network drops and daemon restarts by resuming its session.

const BACKOFF_INITIAL_MS = 250; // the same policy as the Python SDK (streamd_client.reconnect)
const BACKOFF_MAX_MS = 5000;
const BACKOFF_JITTER = 0.2; // so that the clients of a restarted daemon do not return in lockstep
const BYTES_PER_MS = 32; // 16 kHz x 2 bytes, mono
const MAX_QUEUED_MS = 30000; // audio kept while disconnected; beyond it the oldest is dropped
const MAX_SENT_MS = 30000; // audio kept after sending, to resend what a dropped connection lost
const MAX_IN_FLIGHT_MS = 2000; // more than this unsent in the socket: hold audio in our queue
const STOP_TIMEOUT_MS = 15000; // Stop waits this long for the server to confirm the last words

// Errors before `ready` that reject the `start` message itself: retrying cannot help.
const START_REJECTED = new Set(["bad_message", "bad_audio_format"]);

/**
 * States (reported through onState, mirrored on <body data-state>):
 *   connecting   - first connection, until the server says `ready`
 *   listening    - audio flows
 *   reconnecting - the connection dropped; retrying with backoff, audio is queued meanwhile
 *   stopping     - Stop was pressed: the last audio and `end` go out, waiting for `closed`
 *   closed       - the stream is over
 *   error        - a problem retrying cannot fix (wrong token, rejected start)
 */
export class StreamClient {
  /**
   * @param {{url: string, start: object,
   *          onMessage: (message: object) => void,
   *          onState: (state: string, info: object) => void}} options
   *   `start` is the start message without `type` and `resume`; onMessage gets every server
   *   message except finals already delivered (a resumed session re-sends them).
   */
  constructor({ url, start, onMessage, onState }) {
    this.url = url;
    this.start = start;
    this.onMessage = onMessage;
    this.onState = onState;
    this.state = "idle";
    this.ws = null;
    this.ready = false;
    this.session = null;
    this.lastSeq = 0; // the session's newest seq seen: `after_seq` when resuming
    this.lastFinalSeq = 0;
    this.queue = [];
    this.queuedBytes = 0;
    this.droppedMs = 0;
    // What went into the socket, kept to resend what a dropped connection lost in flight:
    // [{pos, chunk}] in session byte positions; sentBytes is where the next chunk starts.
    this.sent = [];
    this.sentBytes = 0;
    this.resentMs = 0;
    this.received = {}; // messages by type on the current connection (for diagnostics)
    this.attempt = 0;
    this.retryTimer = null;
    this.stopTimer = null;
    this.stopping = false;
    this.audioComplete = false; // stop(): the microphone's last chunk is queued
    this.endSent = false;
    this.fatal = null; // an error that ends the stream
    this.lastFatal = null; // an error after which the server closes, but a retry may help
    this.closedReason = null;
    this.waiters = [];
    this.retryNow = () => {
      if (this.retryTimer !== null) this.open();
    };
  }

  connect() {
    window.addEventListener("online", this.retryNow);
    this.setState("connecting", {});
    this.open();
  }

  /** Queue one pcm_s16le chunk; it is sent as soon as the session is ready. */
  sendAudio(pcm) {
    if (this.isOver() || this.endSent) return;
    this.queue.push(pcm);
    this.queuedBytes += pcm.byteLength;
    while (this.queuedBytes > MAX_QUEUED_MS * BYTES_PER_MS) {
      const old = this.queue.shift();
      this.queuedBytes -= old.byteLength;
      this.droppedMs += old.byteLength / BYTES_PER_MS;
    }
    this.pump(false);
  }

  /**
   * End the stream: once `flushed` resolves (the last audio is queued), send it and `end`, and
   * wait for the server's `closed` (every final delivered). Resolves when the stream is over.
   */
  async stop(flushed) {
    const over = new Promise((resolve) => this.waiters.push(resolve));
    if (!this.isOver()) {
      this.stopping = true;
      this.setState("stopping", {});
    }
    await flushed;
    this.audioComplete = true;
    if (this.isOver()) {
      this.finish(this.state, {}); // it ended meanwhile (an error): just release the waiters
    } else if (this.session === null) {
      this.finish("closed", {}); // nothing was transcribed yet: nothing to wait for
    } else {
      this.stopTimer = setTimeout(() => this.finish("closed", { timedOut: true }), STOP_TIMEOUT_MS);
      if (this.ready) this.sendEnd();
      else if (this.retryTimer !== null) this.open(); // deliver the last words now, not later
    }
    return over;
  }

  isOver() {
    return this.state === "closed" || this.state === "error";
  }

  // -- connection ----------------------------------------------------------------------------

  open() {
    clearTimeout(this.retryTimer);
    this.retryTimer = null;
    const ws = new WebSocket(this.url);
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    this.ready = false;
    this.received = {};
    this.fatal = null;
    this.lastFatal = null;
    this.closedReason = null;
    ws.onopen = () => ws.send(JSON.stringify(this.startMessage()));
    ws.onmessage = (event) => {
      if (ws === this.ws) this.receive(event.data);
    };
    ws.onclose = (event) => {
      if (ws === this.ws) this.closed(event);
    };
  }

  startMessage() {
    const message = { type: "start", ...this.start };
    if (this.session !== null) {
      message.resume = { session: this.session, after_seq: this.lastSeq };
    }
    return message;
  }

  receive(data) {
    if (typeof data !== "string") return; // the server sends no binary frames
    let message;
    try {
      message = JSON.parse(data);
    } catch {
      return;
    }
    this.received[message.type] = (this.received[message.type] ?? 0) + 1;
    if (this.ready && Number.isInteger(message.seq)) {
      this.lastSeq = Math.max(this.lastSeq, message.seq);
    }
    switch (message.type) {
      case "ready":
        this.opened(message);
        return;
      case "final":
        if (message.seq <= this.lastFinalSeq) return; // re-sent after a resume: already shown
        this.lastFinalSeq = message.seq;
        break;
      case "error":
        this.serverError(message);
        break;
      case "closed":
        this.closedReason = message.reason;
        break;
    }
    this.onMessage(message);
  }

  opened(message) {
    if (message.session !== this.session) {
      // a new session (the first, or the old one was unknown to the server): its own seqs
      this.session = message.session;
      this.lastSeq = 0;
      this.lastFinalSeq = 0;
      this.sent = [];
      this.sentBytes = 0;
    } else if (message.resumed) {
      this.resendUnheard(Number(message.audio_s) || 0);
    }
    this.ready = true;
    this.attempt = 0;
    this.onMessage(message);
    if (this.stopping) {
      if (this.audioComplete) this.sendEnd(); // else stop() sends it once the mic is flushed
    } else {
      this.setState("listening", { resumed: message.resumed === true });
      this.pump(false);
    }
  }

  serverError(message) {
    if (message.code === "unauthorized" || (!this.ready && START_REJECTED.has(message.code))) {
      this.fatal = message;
      this.ws.close();
    } else if (!this.ready && message.code === "session_in_use") {
      // the server has not yet seen our previous connection drop; it will, so try again
      this.ws.close();
    } else if (message.fatal) {
      this.lastFatal = message; // the server closes now; say why while we retry
    } else if (this.state === "listening") {
      this.setState("listening", { notice: message });
    }
  }

  closed(event) {
    this.ws = null;
    this.ready = false;
    if (this.fatal) {
      this.finish("error", { error: this.fatal });
    } else if (this.closedReason !== null && this.closedReason !== "shutdown") {
      this.finish("closed", {});
    } else if (this.closedReason === "shutdown") {
      this.scheduleRetry("the server is restarting");
    } else if (this.lastFatal) {
      this.scheduleRetry(`${this.lastFatal.message} [${this.lastFatal.code}]`);
    } else {
      // 1006: no close frame (network gone, server unreachable or killed)
      const reason = event.code === 1006 ? "connection lost" : `closed with code ${event.code}`;
      this.scheduleRetry(reason);
    }
  }

  scheduleRetry(reason) {
    // The first retry is immediate: a blip usually heals at once.
    const base = Math.min(BACKOFF_INITIAL_MS * 2 ** (this.attempt - 1), BACKOFF_MAX_MS);
    const delayMs = this.attempt === 0 ? 0 : base * (1 + BACKOFF_JITTER * (2 * Math.random() - 1));
    this.attempt += 1;
    let state = this.session === null ? "connecting" : "reconnecting";
    if (this.stopping) state = "stopping";
    this.setState(state, { retry: { attempt: this.attempt, delayMs, reason } });
    this.retryTimer = setTimeout(() => this.open(), delayMs);
  }

  /** Put what we sent after the server's `audio_s` back at the front of the queue: it was in
   * flight (our socket buffer, the network, the server's receive buffer) when the connection
   * died. Nothing is heard twice: the cut is on a sample boundary at or after audio_s. */
  resendUnheard(audioS) {
    const heard = 2 * Math.floor((audioS * BYTES_PER_MS * 1000) / 2);
    const again = [];
    for (const { pos, chunk } of this.sent) {
      const end = pos + chunk.byteLength;
      if (end <= heard) continue;
      again.push(pos >= heard ? chunk : chunk.slice(heard - pos));
    }
    const oldest = this.sent.length > 0 ? this.sent[0].pos : this.sentBytes;
    if (oldest > heard) this.droppedMs += (oldest - heard) / BYTES_PER_MS; // beyond what we kept
    const bytes = again.reduce((sum, chunk) => sum + chunk.byteLength, 0);
    this.resentMs += bytes / BYTES_PER_MS;
    this.queue.unshift(...again);
    this.queuedBytes += bytes;
    this.sent = [];
    this.sentBytes = heard; // the server's timeline: our next byte lands there
  }

  pump(all) {
    const ws = this.ws;
    if (!ws || !this.ready || ws.readyState !== WebSocket.OPEN) return;
    while (this.queue.length > 0 && (all || ws.bufferedAmount < MAX_IN_FLIGHT_MS * BYTES_PER_MS)) {
      const chunk = this.queue.shift();
      this.queuedBytes -= chunk.byteLength;
      ws.send(chunk);
      this.sent.push({ pos: this.sentBytes, chunk });
      this.sentBytes += chunk.byteLength;
    }
    while (this.sent.length > 0 && this.sentBytes - this.sent[0].pos > MAX_SENT_MS * BYTES_PER_MS) {
      this.sent.shift();
    }
  }

  sendEnd() {
    this.pump(true);
    this.ws.send(JSON.stringify({ type: "end" }));
    this.endSent = true;
  }

  finish(state, info) {
    clearTimeout(this.retryTimer);
    clearTimeout(this.stopTimer);
    this.retryTimer = null;
    window.removeEventListener("online", this.retryNow);
    const ws = this.ws;
    this.ws = null;
    ws?.close();
    this.queue = [];
    this.queuedBytes = 0;
    if (this.state !== state) this.setState(state, info);
    for (const resolve of this.waiters.splice(0)) resolve();
  }

  setState(state, info) {
    this.state = state;
    this.onState(state, { ...info, droppedMs: this.droppedMs, resentMs: this.resentMs });
  }
}
