"""The README's screenshots, taken from a real run rather than by hand (`make readme-images`):

    python scripts/readme_images.py [--quick] [--out docs/img]

It trains the 2x2 multirun activation=sigmoid,relu x init=xavier,he on the default config into a throwaway
store, serves the MLflow UI on it as `make ui` does, and captures in headless Chromium (Debian's `chromium`)
  runs_view.png  the curated runs view `make ui` opens: the four children with verdict, val/acc, backprop_ratio
  report.png     the top of the sigmoid/xavier child's report.html (verdict "vanishing", the gradient flow)
`--quick` trains 3 epochs instead of the default 20, for a check that the script still works.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp  # noqa: E402 - MLflow's own dependency; its websocket client speaks the DevTools protocol
from PIL import Image  # noqa: E402

from src.tracking import view  # noqa: E402
from src.tracking.store import client as mlflow_client  # noqa: E402
from src.tracking.urls import page_route  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHILDREN = [f"activation={a},init={i}" for a in ("sigmoid", "relu") for i in ("xavier", "he")]
REPORTED = "activation=sigmoid,init=xavier"  # the vanishing signal is the most instructive report
SHOWN_COLUMNS = view.COLUMNS[:3]  # verdict, val/acc, backprop_ratio
TIMEOUT_S = 60  # for the server to answer, and for each page to render
# MLflow >= 3.17 opens its assistant panel over a quarter of the page on a browser's first visit; a README shows
# the runs, so this browser counts as one that has seen and closed it
NO_ASSISTANT = ("localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');"
                "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');")
# Each page's check returns what it still misses; [] once it shows everything. The UI fills its table after
# load, so the rows and the cells of our columns must be there, non-empty and inside the window (not scrolled
# off to the right, where the grid puts tag columns).
RUNS_READY = """(() => {
  const inside = e => { const r = e.getBoundingClientRect();
                        return r.width > 0 && r.left >= 0 && r.right <= innerWidth && r.bottom <= innerHeight; };
  const cells = [...document.querySelectorAll('.ag-cell')].filter(inside);
  const names = cells.flatMap(c => [...c.querySelectorAll('a')].map(a => a.textContent.trim()));
  return [...NAMES.filter(n => !names.includes(n)),
          ...COLUMNS.filter(k => cells.filter(c => c.getAttribute('col-id') === k && c.textContent.trim()).length
                                 < NAMES.length)];
})()""".replace("NAMES", json.dumps(CHILDREN)).replace("COLUMNS", json.dumps(SHOWN_COLUMNS))
REPORT_READY = "document.body && document.body.dataset.drawn === 'true' ? [] : ['<body data-drawn=\"true\">']"
# the report down to its first row of per-module charts (verdict, headline numbers, the gradient flow heatmap),
# their legends left out: they only fill in on hover
REPORT_BOTTOM = """(() => { const chart = document.querySelector('#layers .chart');
  if (!chart) return innerHeight;
  const legend = chart.querySelector('.u-legend');
  return legend ? legend.getBoundingClientRect().top - 4 : chart.getBoundingClientRect().bottom + 8; })()"""


class Failed(RuntimeError):
    """Why no picture was written, in one line."""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="train 3 epochs, not the default config's 20")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "img", help="folder of the PNGs (default docs/img)")
    args = ap.parse_args()
    chromium = shutil.which("chromium")
    if chromium is None:
        print("readme_images: chromium is not installed (Debian: apt-get install chromium)", file=sys.stderr)
        return 1
    # the store, the server's and browser's files all live in tmp; the processes stop (stack) before it goes
    with tempfile.TemporaryDirectory(prefix="readme-images-") as tmp, contextlib.ExitStack() as stack:
        tmp = Path(tmp)
        try:
            uri = f"sqlite:///{tmp / 'mlflow.db'}"
            train(uri, tmp, args.quick)
            client = mlflow_client(uri)
            exp_id = client.get_experiment_by_name("gradflow").experiment_id
            view.share(client, exp_id)  # as make ui does before it serves (the multirun's end wrote it too)
            child = client.search_runs([exp_id], f"attributes.run_name = '{REPORTED}'")[0]
            # the server sends report.html as a download (Content-Disposition: attachment), which a browser
            # does not render, so the report is opened where the run's artifacts are: a file:// folder here
            report = f"{child.info.artifact_uri}/report.html"
            base = serve(uri, tmp, stack)
            shots = asyncio.run(capture(chromium, tmp, stack, [
                ("runs view", base + page_route(exp_id), (1400, 600), RUNS_READY, None),
                ("report", report, (1300, 1600), REPORT_READY, REPORT_BOTTOM),
            ]))
        except Failed as e:
            print(f"readme_images: {e}", file=sys.stderr)
            return 1
    args.out.mkdir(parents=True, exist_ok=True)
    for name, png in zip(("runs_view.png", "report.png"), shots):
        png.save(args.out / name, optimize=True)
        print(args.out / name)
    return 0


def train(uri: str, tmp: Path, quick: bool) -> None:
    """The real 2x2 multirun, on the default config (the pictures show what a user gets), into tmp's store."""
    cmd = [sys.executable, "-m", "src.train", "-m", "activation=sigmoid,relu", "init=xavier,he",
           f"tracking.uri={uri}", f"hydra.sweep.dir={tmp / 'multirun'}", "trainer.enable_progress_bar=false"]
    # $MLFLOW_TRACKING_URI would win over tracking.uri and send the runs to the user's own store
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    if subprocess.run(cmd + ["trainer.max_epochs=3"] * quick, cwd=ROOT, env=env).returncode != 0:
        raise Failed("the multirun failed (its output is above)")


def start(cmd: list[str], log: Path, stack: contextlib.ExitStack) -> subprocess.Popen:
    """cmd in its own process group, stopped with all its helpers when the stack closes, whatever happened."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def stop() -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):  # the group may be gone already
                os.killpg(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
                return
    stack.callback(stop)
    return proc


def serve(uri: str, tmp: Path, stack: contextlib.ExitStack) -> str:
    """The MLflow UI on the store, as make ui starts it, on a free port; its base URL once it answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    server = start([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
                    "--port", str(port)], tmp / "ui.log", stack)
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline and server.poll() is None:
        with contextlib.suppress(OSError):
            urllib.request.urlopen(f"{base}/health", timeout=1)
            return base
        time.sleep(0.5)
    tail = (tmp / "ui.log").read_text(errors="replace").strip().splitlines()[-1:]
    raise Failed(f"the MLflow UI did not answer on {base}/health in {TIMEOUT_S} s: {' '.join(tail)}")


async def capture(chromium: str, tmp: Path, stack: contextlib.ExitStack, pages: list) -> list[Image.Image]:
    """Each page (name, url, window size, ready check, crop bottom or None) shot in one headless Chromium driven
    over the DevTools protocol: the shot is taken only once the page's check finds nothing missing."""
    profile = tmp / "chromium"
    start([chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
           "--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank"], tmp / "chromium.log", stack)
    port_file, deadline = profile / "DevToolsActivePort", time.monotonic() + TIMEOUT_S
    while not (port_file.exists() and "\n" in port_file.read_text()):  # Chromium writes it once it listens
        if time.monotonic() > deadline:
            raise Failed(f"chromium did not start its DevTools server in {TIMEOUT_S} s")
        await asyncio.sleep(0.2)
    targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port_file.read_text().split()[0]}/json/list"))
    tab_url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
    shots = []
    async with aiohttp.ClientSession() as session, session.ws_connect(tab_url, max_msg_size=0) as ws:
        ids = iter(range(1, 1_000_000))

        async def call(method: str, **params):
            sent = next(ids)
            await ws.send_json({"id": sent, "method": method, "params": params})
            async for msg in ws:  # events in between are not ours to read
                reply = json.loads(msg.data)
                if reply.get("id") == sent:
                    if "error" in reply:
                        raise Failed(f"chromium: {method}: {reply['error'].get('message')}")
                    return reply["result"]
            raise Failed("chromium closed the DevTools connection")

        async def evaluate(js: str):
            return (await asyncio.wait_for(call("Runtime.evaluate", expression=js, returnByValue=True), 10))[
                "result"].get("value")

        await call("Page.enable")  # addScriptToEvaluateOnNewDocument does nothing without it
        await call("Page.addScriptToEvaluateOnNewDocument", source=NO_ASSISTANT)
        for name, url, (width, height), ready, bottom in pages:
            await call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                       mobile=False)
            await call("Page.navigate", url=url)
            deadline, missing = time.monotonic() + TIMEOUT_S, ["the page"]
            while missing:
                if time.monotonic() > deadline:
                    raise Failed(f"the {name} never rendered in {TIMEOUT_S} s ({url}); missing: {', '.join(missing)}")
                await asyncio.sleep(0.5)
                missing = await evaluate(ready)
                missing = ["the page"] if missing is None else missing  # before the document exists
            await asyncio.sleep(1)  # the last layout and paint after the data is in
            png = base64.b64decode((await call("Page.captureScreenshot", format="png"))["data"])
            image = Image.open(io.BytesIO(png))
            if bottom is not None:
                image = image.crop((0, 0, width, min(height, int(await evaluate(bottom)))))
            shots.append(image)
    return shots


if __name__ == "__main__":
    sys.exit(main())
