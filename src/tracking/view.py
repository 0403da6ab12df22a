"""The curated runs view `make ui` opens: MLflow's UI restores a shared view from the experiment tag
`mlflow.sharedViewState.<key>` when the URL carries `viewStateShareKey=<key>`. Ours shows each training run
(the runs with a verdict) as a row with its verdict, val/acc, backprop_ratio and the swept settings, best
first, and one line chart per statistic with every module in it: the gradient flow over training.

The tag holds MLflow's own saved-view envelope, {"name", "createdAt", "updatedAt", "state"}, its state
deflate-compressed as the UI writes it ("deflate;" + base64 of zlib data). MLflow drops `runsExpanded` from a
shared view, so parents cannot be opened from it; the view filters the table to the runs that carry a verdict
(the children of a multirun, single runs, sweep trials), which shows them without a click."""
from __future__ import annotations

import base64
import json
import time
import zlib

from mlflow.tracking import MlflowClient

from src.tracking.urls import VIEW_KEY

TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
# the UI refuses experiment tag values above this many characters
MAX_TAG_CHARS = 20000
COLUMNS = ["tags.`verdict`", "metrics.`val/acc`", "metrics.`backprop_ratio`", "params.`activation`",
           "params.`init`", "params.`model.depth`"]
# one chart per statistic, every module's line in it
CHARTED = ("backprop_norm", "grad_norm", "act_saturation", "update_ratio")
HEADLINE = ("val/acc", "train/loss", "backprop_ratio")


def _chart(uuid: str, section: str, name: str, keys: list[str], deleted: bool = False, log: bool = False) -> dict:
    return {"uuid": uuid, "type": "LINE", "metricSectionId": section, "runsCountToCompare": 10, "deleted": deleted,
            "isGenerated": False, "displayName": name, "metricKey": keys[0], "selectedMetricKeys": keys,
            "xAxisKey": "step", "yAxisKey": "metric", "scaleType": "log" if log else "linear",
            "xAxisScaleType": "linear", "lineSmoothness": 0, "selectedXAxisMetricKey": "", "yAxisExpressions": [],
            "ignoreOutliers": False, "useGlobalXaxisKey": True, "useGlobalLineSmoothing": True, "range": {}}


def state(metric_keys: set[str], hide_rest: bool = True) -> dict:
    """The view for an experiment whose runs logged `metric_keys`; `hide_rest`: hide the charts the UI would
    add for every other key."""
    sections = [{"uuid": "gradflow-flow", "name": "gradient flow (every module)", "display": True,
                 "isReordered": False, "deleted": False, "isGenerated": False},
                {"uuid": "gradflow-run", "name": "run", "display": True, "isReordered": False, "deleted": False,
                 "isGenerated": False}]
    charts, used = [], set()
    for stat in CHARTED:
        keys = sorted(k for k in metric_keys if k.startswith(stat + "/"))
        if keys:
            charts.append(_chart(f"gradflow-{stat}", "gradflow-flow", stat, keys, log=stat != "act_saturation"))
            used.add(keys[0])
    for k in HEADLINE:
        if k in metric_keys:
            charts.append(_chart(f"gradflow-{k}", "gradflow-run", k, [k], log=k == "backprop_ratio"))
            used.add(k)
    # the UI adds a chart for every logged key no chart starts with: one per module and statistic, hundreds
    charts += [_chart(f"gradflow-hidden-{i}", "gradflow-run", k, [k], deleted=True)
               for i, k in enumerate(sorted(metric_keys - used)) if hide_rest]
    return {"searchFilter": "tags.verdict LIKE '%'", "orderByKey": "metrics.`val/acc`", "orderByAsc": False,
            "startTime": "ALL", "lifecycleFilter": "Active", "modelVersionFilter": "All Runs", "datasetsFilter": [],
            "selectedColumns": COLUMNS, "runsHiddenMode": "SHOW_ALL", "isAccordionReordered": True,
            "hideEmptyCharts": True, "compareRunSections": sections, "compareRunCharts": charts,
            "globalLineChartConfig": {"xAxisKey": "step", "lineSmoothness": 0, "selectedXAxisMetricKey": ""}}


def encode(view: dict, now_ms: int | None = None) -> str:
    """The tag value: MLflow's saved-view envelope around the deflated state."""
    packed = "deflate;" + base64.b64encode(zlib.compress(json.dumps(view).encode())).decode()
    now_ms = now_ms or int(time.time() * 1000)
    return json.dumps({"name": "gradflow: runs, verdicts, gradient flow", "createdAt": now_ms, "updatedAt": now_ms,
                       "state": packed})


def decode(value: str) -> dict:
    """The state in a tag value written by encode()."""
    packed = json.loads(value)["state"]
    return json.loads(zlib.decompress(base64.b64decode(packed[len("deflate;"):])))


def share(client: MlflowClient, experiment_id: str) -> None:
    """Write the experiment's curated view, for the metric keys its runs have logged so far (nothing when
    even the view without hidden charts is too long for a tag: the URL then opens the UI's own view)."""
    keys: set[str] = set()
    token = None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token)
        for run in page:
            keys.update(run.data.metrics)
        token = page.token
        if not token:
            break
    value = encode(state(keys))
    if len(value) > MAX_TAG_CHARS:  # too many keys to hide each one: the UI then adds their charts below ours
        value = encode(state(keys, hide_rest=False))
    if len(value) <= MAX_TAG_CHARS:
        client.set_experiment_tag(experiment_id, TAG, value)
