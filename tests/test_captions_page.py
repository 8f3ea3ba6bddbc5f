"""The live captions page (clients/web/) in headless Chromium against the real daemon.

Chromium's fake capture device plays a WAV file as the microphone, so the whole browser path
runs: getUserMedia -> AudioWorklet (resample to 16 kHz, s16le) -> websocket -> daemon ->
partials/finals rendered on the page. A screenshot of the captions is kept in test-artifacts/.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from difflib import SequenceMatcher
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import numpy as np
import pytest
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.audio_fixtures import shared_audio_dir
from tests.daemon import Daemon, running_daemon

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
TOKEN = "captions-page-test-token"
# tiny.en streaming hears "And so am I fellow Americans" (so does `streamd replay` of this file)
FIRST_WORDS = "fellow americans"
PHRASE = "ask not what your country can do for you"
LAST_WORDS = "ask what you can do for your country"
CLIP_WORDS = f"and so my {FIRST_WORDS} {PHRASE} {LAST_WORDS}".split()
STALL_S = 2.5  # audio in flight at the cut: ~6 words the page must send again
CAPTIONS_TIMEOUT_S = 60.0
STATE_TIMEOUT_S = 30.0
MIN_SCREENSHOT_BYTES = 30_000  # the idle page is ~14 kB, three lines of captions ~50 kB
MIN_PARTIAL_SCREENSHOT_BYTES = 16_000

# Installed before any page script runs (CDP addScriptToEvaluateOnNewDocument), so it sees every
# partial however briefly it is shown, and every state the page goes through.
RECORDER_JS = """
(() => {
  const log = {states: [], statuses: [], partials: [], maxPartials: 0};
  window.__captionsLog = log;
  const check = () => {
    const state = document.body && document.body.dataset.state;
    if (state && log.states[log.states.length - 1] !== state) log.states.push(state);
    const status = document.getElementById("status");
    const said = status && status.textContent;
    if (said && log.statuses[log.statuses.length - 1] !== said) log.statuses.push(said);
    const partials = document.querySelectorAll("#captions .partial");
    log.maxPartials = Math.max(log.maxPartials, partials.length);
    for (const el of partials) {
      const text = el.textContent.trim();
      const last = log.partials[log.partials.length - 1];
      if (text && (!last || last.text !== text)) {
        log.partials.push({text, color: getComputedStyle(el).color});
      }
    }
  };
  new MutationObserver(check).observe(document, {
    subtree: true, childList: true, characterData: true, attributes: true,
  });
})();
"""


def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


# Renders a synthetic signal through pcm-worklet.js in an OfflineAudioContext (faster than real
# time, no microphone) and returns the 16 kHz s16le samples it posted. `spec`: rate (Hz),
# seconds, channels: one list per channel of {freq, amp} tones and {click_s, amp} impulses.
RESAMPLE_JS = """
const [spec, done] = arguments;
(async () => {
  const length = Math.round(spec.rate * spec.seconds);
  const ctx = new OfflineAudioContext({numberOfChannels: 1, length, sampleRate: spec.rate});
  await ctx.audioWorklet.addModule("pcm-worklet.js");
  const buffer = ctx.createBuffer(spec.channels.length, length, spec.rate);
  spec.channels.forEach((parts, c) => {
    const data = buffer.getChannelData(c);
    for (const part of parts) {
      if (part.click_s !== undefined) {
        data[Math.round(part.click_s * spec.rate)] += part.amp;
        continue;
      }
      for (let i = 0; i < length; i++) {
        data[i] += part.amp * Math.sin(2 * Math.PI * part.freq * i / spec.rate);
      }
    }
  });
  const node = new AudioWorkletNode(ctx, "pcm-s16-16k", {outputChannelCount: [1]});
  const chunks = [];
  const flushed = new Promise((resolve) => {
    node.port.onmessage = (event) => {
      if (event.data.type === "pcm") chunks.push(event.data.pcm);
      else if (event.data.type === "flushed") resolve();
    };
  });
  const source = new AudioBufferSourceNode(ctx, {buffer});
  source.connect(node);
  node.connect(ctx.destination);
  source.start();
  await ctx.startRendering();
  node.port.postMessage({type: "flush"});
  await flushed;
  const samples = [];
  for (const chunk of chunks) {
    const view = new DataView(chunk);
    for (let i = 0; i < chunk.byteLength; i += 2) samples.push(view.getInt16(i, true));
  }
  done({samples, chunkBytes: chunks.map((c) => c.byteLength)});
})().catch((err) => done({error: String(err && err.stack || err)}));
"""


@dataclass(eq=False)  # identity: pairs live in a set
class _Pair:
    client: socket.socket
    upstream: socket.socket
    directions_open: int = 2


class CuttableProxy:
    """A TCP relay to the daemon that can drop every connection through it at once, as a network
    failure would: the page's websocket ends without a close frame (code 1006). It can also
    stall first (stop passing data towards the daemon), so that audio is in flight at the cut."""

    def __init__(self, upstream_port: int) -> None:
        self._upstream = ("127.0.0.1", upstream_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._pairs: set[_Pair] = set()
        self._threads: list[threading.Thread] = []
        self._flowing = threading.Event()
        self._flowing.set()
        self._spawn(self._accept)

    def __enter__(self) -> CuttableProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self._listener.close()  # _accept ends
        self.cut()
        for thread in self._threads:
            thread.join(5)

    def cut(self) -> int:
        """Drop every open connection; how many there were."""
        with self._lock:
            doomed, self._pairs = self._pairs, set()
        for pair in doomed:
            _drop(pair.client)
            _drop(pair.upstream)
        self._flowing.set()  # a stalled pump wakes up to a dropped socket: its data is lost
        return len(doomed)

    def stall(self) -> None:
        """Hold everything the page sends from now on (until the cut, which drops it)."""
        self._flowing.clear()

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # the listener was closed
            try:
                upstream = socket.create_connection(self._upstream)
            except OSError:
                client.close()
                continue
            pair = _Pair(client, upstream)
            with self._lock:
                self._pairs.add(pair)
            self._spawn(self._pump, pair, client, upstream, self._flowing)
            self._spawn(self._pump, pair, upstream, client)

    def _pump(
        self,
        pair: _Pair,
        src: socket.socket,
        dst: socket.socket,
        flowing: threading.Event | None = None,
    ) -> None:
        try:
            while data := src.recv(65536):
                if flowing is not None:
                    flowing.wait()
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)  # pass the orderly end on; the other way may go on
        except OSError:
            return  # cut
        with self._lock:
            pair.directions_open -= 1
            if pair.directions_open or pair not in self._pairs:
                return
            self._pairs.discard(pair)
        _drop(pair.client)
        _drop(pair.upstream)


def _drop(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)  # wakes a pump thread blocked in recv
    sock.close()


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    for tool in (CHROMIUM, CHROMEDRIVER):
        if not tool.is_file():
            pytest.skip(f"{tool} is not installed (apt-get install chromium chromium-driver)")
    # one torch thread: Chromium needs the other core to keep its audio in real time
    with running_daemon(
        tmp_path_factory.mktemp("captions"), "--token", TOKEN, "--threads", "1"
    ) as d:
        yield d


@pytest.fixture(scope="module")
def fake_mic_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """JFK's "ask not" clip as the microphone: 48 kHz stereo, 1 s of silence before, 2 s after.

    48 kHz stereo (not 16 kHz mono) so that the page's downmix and resampler do real work.
    """
    sox = shutil.which("sox")
    if sox is None:
        pytest.skip("sox is not installed")
    wav = tmp_path_factory.mktemp("fake-mic") / "jfk-48k.wav"
    source = shared_audio_dir() / "en" / "jfk.flac"
    subprocess.run(
        [sox, str(source), "-r", "48000", "-c", "2", "-b", "16", str(wav), "pad", "1", "2"],
        check=True,
    )
    return wav


@pytest.fixture(scope="module")
def quiet_mic_wav(fake_mic_wav: Path) -> Path:
    """The same microphone 18 dB quieter: its speech at about -27 to -31 dBFS."""
    wav = fake_mic_wav.with_name("jfk-48k-quiet.wav")
    subprocess.run(
        [str(shutil.which("sox")), str(fake_mic_wav), str(wav), "vol", "-18dB"], check=True
    )
    return wav


def chromium(fake_mic: Path) -> webdriver.Chrome:
    """Headless Chromium through /usr/bin/chromedriver (never Selenium Manager: no internet)."""
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--window-size=1280,800",
        "--disable-dev-shm-usage",
        "--autoplay-policy=no-user-gesture-required",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
    ):
        options.add_argument(arg)
    # %noloop: play the file once, then silence (Chromium 156 loops it by default: checked)
    options.add_argument(f"--use-file-for-fake-audio-capture={fake_mic}%noloop")
    if os.geteuid() == 0:
        options.add_argument("--no-sandbox")  # Chromium refuses to sandbox as root
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": RECORDER_JS})
    return driver


@pytest.fixture
def browser(fake_mic_wav: Path) -> Iterator[webdriver.Chrome]:
    driver = chromium(fake_mic_wav)
    try:
        yield driver
    finally:
        driver.quit()


# -- page helpers --------------------------------------------------------------------------------


def page_url(base: str, **params: str) -> str:
    return f"{base}/?{urlencode(params)}"


def state(driver: webdriver.Chrome) -> str:
    return str(driver.find_element(By.TAG_NAME, "body").get_attribute("data-state"))


def status(driver: webdriver.Chrome) -> str:
    return str(driver.find_element(By.ID, "status").text)


def finals_text(driver: webdriver.Chrome) -> str:
    spans = driver.find_elements(By.CSS_SELECTOR, "#captions .final")
    return normalise(" ".join(str(s.get_attribute("textContent")) for s in spans))


def recorded(driver: webdriver.Chrome) -> dict[str, Any]:
    log: dict[str, Any] = driver.execute_script("return window.__captionsLog")
    return log


def diagnostics(driver: webdriver.Chrome) -> str:
    console = "\n".join(str(entry.get("message")) for entry in driver.get_log("browser"))
    client = driver.execute_script(CLIENT_STATE_JS)
    return (
        f"state={state(driver)!r} status={status(driver)!r}\nfinals={finals_text(driver)!r}\n"
        f"recorded={recorded(driver)}\nclient={client}\nbrowser console:\n{console}"
    )


CLIENT_STATE_JS = """
const c = window.streamdClient;
if (!c) return null;
return {state: c.state, ready: c.ready, session: c.session, lastSeq: c.lastSeq,
        queued: c.queue.length, queuedBytes: c.queuedBytes, sentBytes: c.sentBytes,
        kept: c.sent.length, resentMs: c.resentMs, droppedMs: c.droppedMs, received: c.received,
        wsState: c.ws && c.ws.readyState, buffered: c.ws && c.ws.bufferedAmount};
"""


def wait_until(
    driver: webdriver.Chrome,
    condition: Callable[[webdriver.Chrome], Any],
    timeout_s: float,
    what: str,
    daemon: Daemon | None = None,
) -> Any:
    try:
        return WebDriverWait(driver, timeout_s, poll_frequency=0.2).until(condition)
    except TimeoutException:
        extra = "" if daemon is None else daemon_state(daemon)
        pytest.fail(f"no {what} within {timeout_s:.0f} s\n{diagnostics(driver)}{extra}")


METRICS_SHOWN = (
    "streamd_active",
    "streamd_audio",
    "streamd_sessions",
    "streamd_scheduler",
    "streamd_finals",
    "streamd_errors",
    "streamd_engine",
    "streamd_decode_batch_size_count",
)


def daemon_state(daemon: Daemon) -> str:
    """The daemon's side of a failure: its log's tail and its stream metrics."""
    try:
        metrics = [line for line in daemon.metrics().splitlines() if line.startswith(METRICS_SHOWN)]
    except OSError as exc:
        metrics = [f"/metrics failed: {exc}"]
    tail = "".join(daemon.output[-40:])
    journals = "\n".join(
        f"{path.name}: {path.read_text()}" for path in sorted(daemon.journal_dir.glob("*.jsonl"))
    )
    return (
        "\ndaemon metrics:\n"
        + "\n".join(metrics)
        + f"\ndaemon log (tail):\n{tail}\njournals:\n{journals}"
    )


def final_seqs(driver: webdriver.Chrome) -> list[int]:
    spans = driver.find_elements(By.CSS_SELECTOR, "#captions .final")
    return [int(str(s.get_attribute("data-seq"))) for s in spans]


def keep_screenshot(
    driver: webdriver.Chrome, name: str, min_bytes: int = MIN_SCREENSHOT_BYTES
) -> Path:
    """Save test-artifacts/NAME and check that it is a real PNG of a page with text on it."""
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / name
    shot.unlink(missing_ok=True)
    assert driver.save_screenshot(str(shot))
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n"), "not a PNG"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width >= 1000 and height >= 500, (width, height)  # the 1280x800 window
    assert len(data) > min_bytes, f"{name} looks empty: {len(data)} bytes"
    return shot


# -- tests ---------------------------------------------------------------------------------------


def test_captions_from_fake_microphone(daemon: Daemon, browser: webdriver.Chrome) -> None:
    """Autostart with the right token: the spoken words appear as finals, partials were shown
    greyed and replaced in place, a screenshot is kept, and Stop ends the stream cleanly."""
    browser.get(page_url(daemon.http_url, autostart="1", token=TOKEN))

    # the page's own log (a MutationObserver), not polling: a partial can be replaced by its
    # final between two polls on a busy machine
    wait_until(browser, lambda d: recorded(d)["partials"], CAPTIONS_TIMEOUT_S, "partial")
    if browser.find_elements(By.CSS_SELECTOR, "#captions .partial"):
        # for people: what a partial looks like (the first words only, so a smaller image)
        keep_screenshot(browser, "captions-partial.png", MIN_PARTIAL_SCREENSHOT_BYTES)
    wait_until(browser, lambda d: PHRASE in finals_text(d), CAPTIONS_TIMEOUT_S, f"final {PHRASE!r}")
    wait_until(browser, lambda d: LAST_WORDS in finals_text(d), CAPTIONS_TIMEOUT_S, "last words")
    # the file ends in silence: the VAD closes the utterance and its final clears the partial
    wait_until(
        browser,
        lambda d: not d.find_elements(By.CSS_SELECTOR, "#captions .partial"),
        STATE_TIMEOUT_S,
        "partial cleared by the last final",
    )

    log = recorded(browser)
    partials = log["partials"]
    assert len({p["text"] for p in partials}) >= 2, f"partials never replaced each other: {log}"
    assert log["maxPartials"] == 1, f"more than one partial shown at once: {log}"
    final_color = browser.execute_script(
        "return getComputedStyle(document.querySelector('#captions .final')).color"
    )
    assert final_color == "rgb(0, 0, 0)", final_color
    for partial in partials:
        red, green, blue = map(int, re.findall(r"\d+", partial["color"])[:3])
        assert red == green == blue and 64 <= red <= 192, f"partial not grey: {partial}"
    assert log["states"][:3] == ["idle", "connecting", "listening"], log["states"]
    assert "reconnecting" not in log["states"], log["states"]

    seqs = final_seqs(browser)
    assert seqs == sorted(set(seqs)), f"finals out of order or repeated: {seqs}"
    details = browser.find_element(By.ID, "details").text
    assert "tiny.en" in details and "→ 16 kHz" in details, details
    assert "quiet_input" not in " ".join(recorded(browser)["statuses"])  # a normal level

    keep_screenshot(browser, "captions.png")

    browser.find_element(By.ID, "toggle").click()
    wait_until(browser, lambda d: state(d) == "closed", STATE_TIMEOUT_S, "closed after Stop")
    assert status(browser) == "Stopped.", status(browser)
    assert "stopping" in recorded(browser)["states"]
    assert browser.find_element(By.ID, "toggle").text == "Start"
    # Checked after the stream is over, when every final is in: the words came once, in order.
    text = finals_text(browser)
    expected = rf"and so (\w+ ){{1,2}}{FIRST_WORDS} {PHRASE} {LAST_WORDS}"
    assert re.fullmatch(expected, text), f"words repeated, lost or reordered: {text!r}"


def test_a_quiet_microphone_is_pointed_out(daemon: Daemon, quiet_mic_wav: Path) -> None:
    """18 dB down, the speech_ended levels are under -26 dBFS: the daemon's quiet_input notice
    shows in the status line with the level_offset_db to add to the address; with it in the
    address, no notice comes."""
    driver = chromium(quiet_mic_wav)
    try:
        driver.get(page_url(daemon.http_url, autostart="1", token=TOKEN))
        wait_until(driver, lambda d: "quiet_input" in status(d), CAPTIONS_TIMEOUT_S, "notice")
        found = re.search(r"speech at (-\d+) dBFS.*level_offset_db=(-\d+)", status(driver))
        assert found and state(driver) == "listening", status(driver)
        level, offset = int(found[1]), int(found[2])
        assert -34 <= level <= -26 and offset == level + 20, status(driver)
        driver.get(page_url(daemon.http_url, autostart="1", token=TOKEN, level_offset_db="-8"))
        wait_until(driver, lambda d: PHRASE in finals_text(d), CAPTIONS_TIMEOUT_S, PHRASE)
        wait_until(driver, lambda d: not d.find_elements(By.CSS_SELECTOR, "#captions .partial"),
                   STATE_TIMEOUT_S, "the last final")  # fmt: skip
        assert "quiet_input" not in " ".join(recorded(driver)["statuses"]), recorded(driver)
    finally:
        driver.quit()


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"token": "wrong"}, "missing or wrong token [unauthorized]"),
        ({"token": TOKEN, "language": "ja"}, "English-only; language must be en [bad_message]"),
        (
            {"token": TOKEN, "level_offset_db": "-40"},
            "level_offset_db must be a number of dB in [-30, 20] [bad_message]",
        ),
        (
            {"token": TOKEN, "level_offset_db": "quiet"},
            "level_offset_db must be a number of dB in [-30, 20] [bad_message]",
        ),
    ],
    ids=["wrong-token", "language-the-model-lacks", "level-out-of-range", "level-not-a-number"],
)
def test_refused_stream_shows_the_error(
    daemon: Daemon, browser: webdriver.Chrome, params: dict[str, str], expected: str
) -> None:
    """A stream the server refuses ends in the error state with the server's reason in the
    status line, without retrying (retrying cannot fix a wrong token or language)."""
    browser.get(page_url(daemon.http_url, autostart="1", **params))
    wait_until(browser, lambda d: state(d) == "error", STATE_TIMEOUT_S, "error state")
    assert expected in status(browser), status(browser)
    assert recorded(browser)["states"] == ["idle", "connecting", "error"]
    button = browser.find_element(By.ID, "toggle")
    assert button.text == "Start" and button.is_enabled()
    assert not browser.find_elements(By.CSS_SELECTOR, "#captions .final")


def test_reconnects_and_resumes_after_a_network_cut(
    daemon: Daemon, browser: webdriver.Chrome
) -> None:
    """Started with the button; the network stalls then drops mid-speech; the page resumes the
    same session, sends again the audio that was in flight (from the daemon's `ready.audio_s`),
    and ends up showing exactly the finals the daemon journaled for it: none lost (those the
    daemon finalized after the cut are re-sent on resume), none twice, in order; and the words
    spoken during the stall are there."""
    daemon_port = int(daemon.http_url.rsplit(":", 1)[1])
    with CuttableProxy(daemon_port) as proxy:
        browser.get(page_url(f"http://127.0.0.1:{proxy.port}", token=TOKEN))
        assert state(browser) == "idle"
        browser.find_element(By.ID, "toggle").click()
        wait_until(
            browser,
            lambda d: FIRST_WORDS in finals_text(d),
            CAPTIONS_TIMEOUT_S,
            "first final",
            daemon,
        )
        session = session_id(browser)
        proxy.stall()
        time.sleep(STALL_S)
        assert proxy.cut() >= 1, "the websocket did not go through the proxy"
        wait_until(
            browser,
            lambda d: "reconnecting" in recorded(d)["states"] and state(d) == "listening",
            STATE_TIMEOUT_S,
            "reconnected",
            daemon,
        )
        assert session_id(browser) == session, "a new session instead of resuming"
        assert status(browser).startswith("Listening (reconnected)"), status(browser)
        wait_until(
            browser,
            lambda d: LAST_WORDS in finals_text(d),
            CAPTIONS_TIMEOUT_S,
            "last words",
            daemon,
        )
        browser.find_element(By.ID, "toggle").click()
        wait_until(browser, lambda d: state(d) == "closed", STATE_TIMEOUT_S, "closed after Stop")

    records = [
        json.loads(line)
        for line in (daemon.journal_dir / f"{session}.jsonl").read_text().splitlines()
    ]
    journaled = [r for r in records if r["type"] == "final"]
    assert final_seqs(browser) == [r["seq"] for r in journaled]
    assert finals_text(browser) == normalise(" ".join(r["text"] for r in journaled))
    reasons = [r["reason"] for r in records if r["type"] == "closed"]
    assert reasons == ["client_gone", "end"], reasons
    resent_ms = int(str(browser.find_element(By.TAG_NAME, "body").get_attribute("data-resent-ms")))
    assert resent_ms >= (STALL_S - 0.5) * 1000, resent_ms
    # Without the resend ~6 words spoken during the stall would be missing; with it, at most the
    # word cut in two at the join (and tiny.en's "am I" for "my") differ from the clip.
    heard = finals_text(browser).split()
    matched = SequenceMatcher(None, CLIP_WORDS, heard).get_matching_blocks()
    assert sum(block.size for block in matched) >= len(CLIP_WORDS) - 3, heard


def session_id(driver: webdriver.Chrome) -> str:
    details = str(driver.find_element(By.ID, "details").text)
    match = re.search(r"Session ([0-9a-f]+)", details)
    assert match, details
    return match.group(1)


def test_worklet_resamples_to_16k_without_aliasing(
    daemon: Daemon, browser: webdriver.Chrome
) -> None:
    """pcm-worklet.js on synthetic signals: tones keep their level (downmix = average), tones
    above 8 kHz do not fold back into the speech band, clicks land on the right sample (no
    drift at a fractional ratio), and 16 kHz input is converted to s16 exactly."""
    browser.get(page_url(daemon.http_url))
    browser.set_script_timeout(60)

    # 48 kHz, mono (the common case: a clean 3:1)
    out = render(browser, 48_000, 1.0, [[tone(1000, 0.5)]])
    assert 15_900 <= len(out) <= 16_000, len(out)  # all of it, less the filter's look-ahead
    amplitudes, residual = fit_tones(out, [1000])
    assert amplitudes[0] == pytest.approx(0.5, abs=0.003)
    assert residual < 1e-3 * 0.5, residual  # distortion + noise below -60 dB

    # 44.1 kHz stereo: a fractional ratio, and the downmix averages the channels
    out = render(browser, 44_100, 1.0, [[tone(1000, 0.6)], [tone(3000, 0.2)]])
    amplitudes, residual = fit_tones(out, [1000, 3000])
    assert amplitudes == pytest.approx([0.3, 0.1], abs=0.003)
    assert residual < 1e-3 * 0.3, residual

    # Above the output Nyquist: a plain decimator would turn these into 4 kHz and 7 kHz tones
    for rate, freq in ((48_000, 12_000), (44_100, 9_000)):
        out = render(browser, rate, 1.0, [[tone(freq, 0.5)]])
        assert rms(steady(out)) < 0.5 / np.sqrt(2) * 10 ** (-60 / 20), (rate, freq, rms(out))

    # Timing: impulses at 0.25 s and 0.75 s come out at samples 4000 and 12000
    out = render(browser, 44_100, 1.0, [[click(0.25, 0.9), click(0.75, 0.9)]])
    assert int(np.argmax(np.abs(out[:8000]))) == 4000
    assert int(np.argmax(np.abs(out[8000:]))) + 8000 == 12_000

    # 16 kHz: no resampling, just the s16le conversion (rounded, clipped at full scale)
    out = render(browser, 16_000, 0.5, [[tone(440, 1.2)]])
    expected = np.clip(1.2 * np.sin(2 * np.pi * 440 * np.arange(8000) / 16_000), -1, 1)
    # offline rendering goes in whole 128-frame quanta: the last one is padded with silence
    assert 8000 <= len(out) < 8000 + 128 and not out[8000:].any(), len(out)
    assert np.max(np.abs(out[:8000] * 32767 - np.round(expected * 32767))) <= 1


def tone(freq: float, amp: float) -> dict[str, float]:
    return {"freq": freq, "amp": amp}


def click(at_s: float, amp: float) -> dict[str, float]:
    return {"click_s": at_s, "amp": amp}


def render(
    driver: webdriver.Chrome, rate: int, seconds: float, channels: list[list[dict[str, float]]]
) -> np.ndarray:
    """The worklet's 16 kHz output for `channels` at `rate`, as floats in [-1, 1]."""
    spec = {"rate": rate, "seconds": seconds, "channels": channels}
    result = driver.execute_async_script(RESAMPLE_JS, spec)
    assert "error" not in result, result["error"]
    chunk_bytes = result["chunkBytes"]
    assert all(n == 1280 for n in chunk_bytes[:-1]), chunk_bytes  # 40 ms chunks, one short tail
    return np.asarray(result["samples"], dtype=np.float64) / 32767


def steady(samples: np.ndarray) -> np.ndarray:
    """Without the first and last 50 ms (the filter's start-up, the tail the flush cuts)."""
    return samples[800:-800]


def fit_tones(samples: np.ndarray, freqs: list[float]) -> tuple[list[float], float]:
    """Least-squares amplitude of each tone at 16 kHz, and the RMS of what is left."""
    x = steady(samples)
    t = (np.arange(len(x)) + 800) / 16_000
    basis = np.column_stack([f(2 * np.pi * freq * t) for freq in freqs for f in (np.sin, np.cos)])
    coef, *_ = np.linalg.lstsq(basis, x, rcond=None)
    amplitudes = [float(np.hypot(coef[2 * i], coef[2 * i + 1])) for i in range(len(freqs))]
    return amplitudes, rms(x - basis @ coef)


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x))))
