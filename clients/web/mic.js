// MicCapture: the microphone as 16 kHz mono pcm_s16le chunks (pcm-worklet.js does the DSP).

const WORKLET_URL = new URL("./pcm-worklet.js", import.meta.url);
const PROCESSOR = "pcm-s16-16k";
const FLUSH_TIMEOUT_MS = 1000;
const RESUME_TIMEOUT_MS = 1000;

// Raw microphone audio: Chrome's noise suppression and automatic gain pump and smear speech in
// ways that cost Whisper words, and echo cancellation would remove exactly what meeting captions
// want when a laptop plays the remote side through its speakers.
const AUDIO_CONSTRAINTS = {
  echoCancellation: false,
  noiseSuppression: false,
  autoGainControl: false,
  channelCount: { ideal: 1 },
};

export class MicError extends Error {
  constructor(message, { needsGesture = false } = {}) {
    super(message);
    this.needsGesture = needsGesture; // not a failure: the user only has to press Start
  }
}

function delay(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

export class MicCapture {
  /**
   * @param {{chunkMs: number, onChunk: (pcm: ArrayBuffer) => void, onEnded: () => void}} options
   *   onChunk gets each s16le chunk; onEnded fires if the device goes away (unplugged, revoked).
   */
  constructor({ chunkMs, onChunk, onEnded }) {
    this.chunkMs = chunkMs;
    this.onChunk = onChunk;
    this.onEnded = onEnded;
    this.stream = null;
    this.context = null;
    this.node = null;
    this.flushed = null;
  }

  /** The context's native rate (Hz) once started: what the worklet resamples from. */
  get inputRateHz() {
    return this.context ? this.context.sampleRate : null;
  }

  /** Ask for the microphone and start sending chunks; throws MicError with a readable message. */
  async start() {
    if (!window.isSecureContext || !navigator.mediaDevices?.getUserMedia) {
      throw new MicError(
        "The microphone needs a secure page: open it over https:// or from http://localhost.",
      );
    }
    try {
      this.stream = await navigator.mediaDevices.getUserMedia({ audio: AUDIO_CONSTRAINTS });
    } catch (err) {
      throw new MicError(describeGetUserMediaError(err));
    }
    try {
      this.context = new AudioContext({ latencyHint: "interactive" });
      await this.context.audioWorklet.addModule(WORKLET_URL);
      const source = this.context.createMediaStreamSource(this.stream);
      this.node = new AudioWorkletNode(this.context, PROCESSOR, {
        numberOfInputs: 1,
        numberOfOutputs: 1,
        outputChannelCount: [1],
        processorOptions: { chunkMs: this.chunkMs },
      });
      this.node.port.onmessage = (event) => this.message(event.data);
      source.connect(this.node);
      // The node writes no output (silence), but a node that reaches the destination is pulled
      // by the render loop in every browser; one with no path there is not, everywhere.
      this.node.connect(this.context.destination);
    } catch (err) {
      await this.close();
      throw new MicError(`Could not start audio processing: ${err.message ?? err}`);
    }
    // A context made without a click (autostart) starts suspended unless the browser's autoplay
    // policy allows it, and resume() then waits for a click that may never come.
    await Promise.race([this.context.resume(), delay(RESUME_TIMEOUT_MS)]);
    if (this.context.state !== "running") {
      await this.close();
      throw new MicError("Press Start to begin: this browser wants a click before it records.", {
        needsGesture: true,
      });
    }
    for (const track of this.stream.getAudioTracks()) {
      track.addEventListener("ended", () => this.onEnded());
    }
  }

  message(data) {
    if (data.type === "pcm") this.onChunk(data.pcm);
    else if (data.type === "flushed" && this.flushed) this.flushed();
  }

  /** Deliver the last partial chunk (so the final words are not cut), then release the mic. */
  async stop() {
    if (this.node && this.context?.state === "running") {
      const done = new Promise((resolve) => {
        this.flushed = resolve;
        setTimeout(resolve, FLUSH_TIMEOUT_MS);
      });
      this.node.port.postMessage({ type: "flush" });
      await done;
    }
    await this.close();
  }

  async close() {
    for (const track of this.stream?.getTracks() ?? []) track.stop();
    this.node?.disconnect();
    if (this.context && this.context.state !== "closed") await this.context.close();
    this.stream = null;
    this.node = null;
    this.context = null;
  }
}

function describeGetUserMediaError(err) {
  switch (err?.name) {
    case "NotAllowedError":
      return "Microphone permission was denied. Allow it in the address bar and press Start.";
    case "NotFoundError":
      return "No microphone was found.";
    case "NotReadableError":
      return "The microphone is busy or unavailable (another application may hold it).";
    default:
      return `Could not open the microphone: ${err?.message ?? err}`;
  }
}
