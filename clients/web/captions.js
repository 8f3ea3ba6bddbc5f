// Captions: the captions region, fed with protocol v1 events.
//
// Layout: one <p> per utterance (a new one when the VAD hears speech start again), finals as
// <span class="final"> in arrival order, and at most one <span class="partial"> after them.

const PARAGRAPH_LIMIT = 500; // older utterances are removed so that a kiosk can run for days
const STICK_TO_BOTTOM_PX = 48; // a reader scrolled further up is not yanked back down
const BREAK_TOLERANCE_S = 0.05; // word times are rounded to milliseconds

export class Captions {
  /** @param {HTMLElement} region the scrollable, aria-live captions element */
  constructor(region) {
    this.region = region;
    this.partial = null;
    this.partialSegment = -1;
    this.finalSegment = -1; // the newest segment shown as final
    this.breakAt = null; // audio time (s) where the next utterance starts
    this.newParagraph = false;
  }

  /** A new session: its segment ids start again at 0, and its text starts on a new line. */
  newSession() {
    this.update(() => this.removePartial());
    this.finalSegment = -1;
    this.partialSegment = -1;
    this.breakAt = null;
    this.newParagraph = true;
  }

  speechStarted(t) {
    this.breakAt = t;
  }

  /** A `partial` message: replaces the tentative text; empty text withdraws it. */
  showPartial({ segment, start, text }) {
    if (segment <= this.finalSegment) return; // arrived after its own final: stale
    this.update(() => {
      if (!text.trim()) {
        this.removePartial();
        return;
      }
      const paragraph = this.paragraphFor(start);
      if (this.partial === null) {
        this.partial = document.createElement("span");
        this.partial.className = "partial";
        // Screen readers get finals only: announcing a text rewritten every half second would
        // drown the listener, and every word of it comes back in a final within seconds.
        this.partial.setAttribute("aria-hidden", "true");
      }
      if (this.partial.parentNode !== paragraph) paragraph.append(this.partial);
      this.partial.textContent = text;
      this.partialSegment = segment;
    });
  }

  /** A `final` message: appended for good; clears the partial it replaces. */
  addFinal({ seq, segment, start, text }) {
    this.update(() => {
      const paragraph = this.paragraphFor(start);
      const span = document.createElement("span");
      span.className = "final";
      span.dataset.seq = String(seq);
      span.dataset.segment = String(segment);
      // Whisper's leading spaces are kept: they separate words (Japanese has none)
      span.textContent = text;
      if (this.partial?.parentNode === paragraph) paragraph.insertBefore(span, this.partial);
      else paragraph.append(span);
      this.finalSegment = Math.max(this.finalSegment, segment);
      if (this.partialSegment <= segment) this.removePartial();
      while (this.region.childElementCount > PARAGRAPH_LIMIT) {
        this.region.firstElementChild.remove();
      }
    });
  }

  /** Drop the tentative text (its words come back as finals, e.g. after a reconnect). */
  clearPartial() {
    this.update(() => this.removePartial());
  }

  removePartial() {
    this.partial?.remove();
    this.partial = null;
    this.partialSegment = -1;
  }

  paragraphFor(start) {
    const last = this.region.lastElementChild;
    const utteranceStarts = this.breakAt !== null && start >= this.breakAt - BREAK_TOLERANCE_S;
    if (utteranceStarts || this.newParagraph) {
      this.breakAt = null;
      this.newParagraph = false;
      if (last !== null && last.querySelector(".final") !== null) return this.addParagraph();
    }
    return last ?? this.addParagraph();
  }

  addParagraph() {
    const paragraph = document.createElement("p");
    this.region.append(paragraph);
    return paragraph;
  }

  update(change) {
    const region = this.region;
    const atBottom =
      region.scrollHeight - region.scrollTop - region.clientHeight <= STICK_TO_BOTTOM_PX;
    change();
    if (atBottom) region.scrollTop = region.scrollHeight;
  }
}
