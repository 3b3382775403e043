"""Detection boxes, metrics and the paired comparison (issue 18): box validation and geometry,
COCO mAP against hand-computed values, the fast resampling AP against torchmetrics, the
threshold chooser, and the bootstrap CI's behaviour (coverage, clear wins, no difference)."""

import json
import time

import numpy as np
import pytest

from quarkflow_core.detection import boxes as B
from quarkflow_core.detection import metrics as M
from quarkflow_core.detection.compare import bootstrap_weights, compare_detectors
from quarkflow_core.detection.synth import digits_on_photos
from quarkflow_core.errors import InvalidInput

pytestmark = pytest.mark.unit

CLASSES = [str(i) for i in range(10)]
SIZE = 320


def _truth(boxes, labels):
    return {
        "boxes": np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        "labels": np.asarray(labels, dtype=np.int64),
    }


def _pred(boxes, labels, scores):
    return {**_truth(boxes, labels), "scores": np.asarray(scores, dtype=np.float32)}


def _random_truths(n: int, seed: int) -> list[dict]:
    """Ground truth without pixels (fast, for populations): 2-6 boxes per image, long side
    log-uniform 12..180 px, so every COCO size bucket is filled."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k = int(rng.integers(2, 7))
        side = np.exp(rng.uniform(np.log(12), np.log(180), size=(k, 1)))
        wh = side * np.c_[rng.uniform(0.5, 1.0, k), np.ones(k)]
        xy = rng.uniform(0, 1, (k, 2)) * (SIZE - wh)
        out.append(_truth(np.c_[xy, xy + wh], rng.integers(0, 10, k)))
    return out


def _noisy(truths, seed, *, miss=0.15, wrong=0.1, false_alarms=1.5, jitter=0.08):
    """A plausible detector: jittered boxes (std ``jitter`` of the size), some missed, some
    with a wrong label, and false alarms scored lower than hits on average."""
    rng = np.random.default_rng(seed)
    out = []
    for t in truths:
        keep = rng.random(len(t["labels"])) >= miss
        b, lab = t["boxes"][keep].astype(np.float64), t["labels"][keep].copy()
        wh = b[:, 2:] - b[:, :2]
        b = b + rng.normal(0, jitter, b.shape) * np.c_[wh, wh]
        flip = rng.random(len(lab)) < wrong
        lab[flip] = rng.integers(0, 10, int(flip.sum()))
        k = int(rng.poisson(false_alarms))
        xy = rng.uniform(0, SIZE - 40, (k, 2))
        fa = np.c_[xy, np.minimum(xy + rng.uniform(8, 120, (k, 2)), SIZE)]
        out.append(
            _pred(
                np.r_[b, fa],
                np.r_[lab, rng.integers(0, 10, k)],
                np.r_[rng.beta(5, 2, len(lab)), rng.beta(2, 5, k)],
            )
        )
    return out


def _plain(obj) -> bool:
    """Only JSON's own types, no numpy scalars and no NaN."""
    if isinstance(obj, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in obj.items())
    if isinstance(obj, list):
        return all(_plain(v) for v in obj)
    if type(obj) is float:
        return bool(np.isfinite(obj))
    return obj is None or type(obj) in (int, str, bool)


@pytest.fixture(scope="module")
def synth_truths():
    samples = digits_on_photos(60, seed=5)
    return [_truth(s.boxes, [int(x) for x in s.labels]) for s in samples]


# --------------------------------------------------------------------------- boxes


def test_parse_boxes_normalises():
    got = B.parse_boxes(
        [
            {"label": "3", "box": [10, 20.123, 30.456, 40]},
            {"label": "7", "box": [-0.6, 0, 100.9, 50]},  # overshoot <= 1 px: clipped
            {"label": "7", "box": [1, 2, 3, 4], "score": 0.3},  # score dropped: ground truth
        ],
        width=100,
        height=50,
        classes=CLASSES,
    )
    assert got == [
        {"label": "3", "box": [10.0, 20.12, 30.46, 40.0]},
        {"label": "7", "box": [0.0, 0.0, 100.0, 50.0]},
        {"label": "7", "box": [1.0, 2.0, 3.0, 4.0]},
    ]
    scored = B.parse_boxes(
        [{"label": "1", "box": [1, 1, 5, 5], "score": 0.93}],
        width=10,
        height=10,
        classes=CLASSES,
        scored=True,
    )
    assert scored == [{"label": "1", "box": [1.0, 1.0, 5.0, 5.0], "score": 0.93}]
    assert B.parse_boxes([], width=10, height=10, classes=CLASSES) == []


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"label": "1"}, "must be a list"),
        ([{"label": "x", "box": [0, 0, 1, 1]}], "box 0: unknown label 'x'; valid labels: 0, 1"),
        ([{"label": 7, "box": [0, 0, 1, 1]}], "box 0: label must be a string"),
        ([{"label": "1", "box": [0, 0, "a", 1]}], "box 0: x2 must be a number, got 'a'"),
        ([{"label": "1", "box": [0, 0, True, 1]}], "box 0: x2 must be a number"),
        ([{"label": "1", "box": [0, float("nan"), 2, 1]}], "box 0: y1 must be finite"),
        ([{"label": "1", "box": [0, 0, 1]}], "box 0: box must be [x1, y1, x2, y2]"),
        (
            [{"label": "1", "box": [0, 0, 1, 1]}, {"label": "1", "box": [5, 0, 5, 1]}],
            "box 1: box [5, 0, 5, 1] is empty or inverted",
        ),
        (
            [{"label": "1", "box": [0, 0, 1, 1]}] * 2 + [{"label": "1", "box": [0, 0, 12, 5]}],
            "box 2: x2 = 12 is outside the 10x10 image",
        ),
        ([{"label": "1", "box": [-3, 0, 1, 1]}], "box 0: x1 = -3 is outside"),
        ([{"label": "1", "box": [10.2, 0, 10.9, 1]}], "box 0: box is empty once clipped"),
        ([{"label": "1"}], "box 0: missing box"),
        ([{"label": "1", "bbox": [0, 0, 1, 1], "box": [0, 0, 1, 1]}], "unknown key(s) bbox"),
        ([["1", 0, 0, 1, 1]], "box 0: must be an object"),
        ([{"label": "1", "box": [0, 0, 1, 1]}] * 301, "301 boxes in one image; at most 300"),
    ],
)
def test_parse_boxes_refuses_with_the_reason(raw, message):
    with pytest.raises(InvalidInput) as err:
        B.parse_boxes(raw, width=10, height=10, classes=CLASSES)
    assert message in str(err.value)


def test_parse_boxes_scored_needs_a_score_in_range():
    box = {"label": "1", "box": [0, 0, 1, 1]}
    with pytest.raises(InvalidInput, match="box 0: missing score"):
        B.parse_boxes([box], width=10, height=10, classes=CLASSES, scored=True)
    with pytest.raises(InvalidInput, match=r"box 0: score must be in \[0, 1\], got 1.5"):
        B.parse_boxes([{**box, "score": 1.5}], width=10, height=10, classes=CLASSES, scored=True)
    with pytest.raises(InvalidInput, match="image width"):
        B.parse_boxes([box], width=0, height=10, classes=CLASSES)


def test_arrays_round_trip():
    dicts = [{"label": "4", "box": [1.0, 2.0, 3.5, 4.25]}, {"label": "0", "box": [0, 0, 9, 9]}]
    boxes, labels = B.to_arrays(dicts, CLASSES)
    assert boxes.dtype == np.float32 and boxes.shape == (2, 4)
    assert labels.dtype == np.int64 and labels.tolist() == [4, 0]
    back = B.to_dicts(boxes, labels, CLASSES, scores=np.array([0.5, 0.25]))
    assert back == [
        {"label": "4", "box": [1.0, 2.0, 3.5, 4.25], "score": 0.5},
        {"label": "0", "box": [0.0, 0.0, 9.0, 9.0], "score": 0.25},
    ]
    empty = B.to_arrays([], CLASSES)
    assert empty[0].shape == (0, 4) and empty[1].shape == (0,)
    with pytest.raises(InvalidInput, match="unknown label 'z'"):
        B.to_arrays([{"label": "z", "box": [0, 0, 1, 1]}], CLASSES)


def test_iou_matrix():
    a = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], dtype=np.float32)
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [10, 0, 20, 10], [0, 0, 0, 0]])
    iou = B.iou_matrix(a, b)
    assert iou.shape == (2, 4)
    np.testing.assert_allclose(iou[0], [1.0, 50 / 150, 0.0, 0.0])  # touching edges: 0
    np.testing.assert_allclose(iou[1], 0.0)
    assert B.iou_matrix(np.zeros((0, 4)), b).shape == (0, 4)
    assert B.iou_matrix(a, np.zeros((0, 4))).shape == (2, 0)
    assert B.iou_matrix(b[3:], b[3:])[0, 0] == 0.0  # zero union


def test_match_boxes_greedy():
    truth = [{"label": "1", "box": [0, 0, 10, 10]}]
    tight = {"label": "1", "box": [0, 0, 10, 9]}  # IoU 0.9
    loose = {"label": "1", "box": [0, 0, 10, 7]}  # IoU 0.7
    # without scores the best overlap wins; with scores the more confident box claims first
    assert B.match_boxes([loose, tight], truth) == [(1, 0, pytest.approx(0.9))]
    scored = [{**loose, "score": 0.9}, {**tight, "score": 0.6}]
    assert B.match_boxes(scored, truth) == [(0, 0, pytest.approx(0.7))]
    other = [{"label": "2", "box": [0, 0, 10, 9]}]
    assert B.match_boxes(other, truth) == []
    assert B.match_boxes(other, truth, same_label=False) == [(0, 0, pytest.approx(0.9))]
    assert B.match_boxes([loose], truth, iou=0.75) == []
    assert B.match_boxes([], truth) == [] and B.match_boxes(truth, []) == []
    with pytest.raises(InvalidInput, match="iou must be in"):
        B.match_boxes(truth, truth, iou=0)


def test_agreement():
    x = {"label": "1", "box": [0, 0, 10, 10]}
    y = {"label": "2", "box": [50, 50, 60, 60]}
    assert B.agreement([], []) == 1.0
    assert B.agreement([x], []) == 0.0 and B.agreement([], [x]) == 0.0
    assert B.agreement([x, y], [{**y, "score": 0.2}, x]) == 1.0  # order and scores ignored
    assert B.agreement([x, y], [x]) == 0.5 == B.agreement([x], [x, y])
    assert B.agreement([x], [{**x, "label": "2"}]) == 0.0  # a wrong label is a disagreement
    assert B.agreement([x], [{**x, "box": [0, 0, 10, 4]}]) == 0.0  # IoU 0.4
    assert B.agreement([x], [{**x, "box": [0, 0, 10, 4]}], iou=0.3) == 1.0


# --------------------------------------------------------------------------- metrics


def test_perfect_and_empty_predictions(synth_truths):
    perfect = [_pred(t["boxes"], t["labels"], np.ones(len(t["labels"]))) for t in synth_truths]
    rep = M.evaluate_detections(perfect, synth_truths, CLASSES, score_threshold=0.5)
    for key in ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_100"):
        assert rep[key] == 1.0, key
    assert rep["at_threshold"]["f1"] == 1.0
    assert all(v["ap"] == 1.0 for v in rep["per_class"].values())
    empty = [_pred([], [], []) for _ in synth_truths]
    rep = M.evaluate_detections(empty, synth_truths, CLASSES, score_threshold=0.5)
    assert rep["map"] == 0.0 and rep["map_50"] == 0.0 and rep["mar_100"] == 0.0
    assert rep["at_threshold"]["recall"] == 0.0 and rep["best_f1"]["threshold"] is None
    assert rep["pr_curve"]["precision"] == [0.0] * 101
    stats = [M.image_stats(p, t) for p, t in zip(empty, synth_truths, strict=True)]
    assert M.map_from_stats(stats)["map"] == 0.0
    # no true box at all: mAP is undefined, not 0
    no_truth = [_truth([], []) for _ in range(3)]
    rep = M.evaluate_detections([_pred([[0, 0, 5, 5]], [1], [0.9])] * 3, no_truth, CLASSES)
    assert rep["map"] is None and rep["per_class"]["1"]["ap"] is None


def test_hand_computed_ap():
    """One class, two true boxes; hits at scores 0.9 and 0.7, a false alarm at 0.8. Recall
    0..0.5 has precision 1 (51 grid points), 0.51..1 has 2/3 (50 points)."""
    truth = [_truth([[0, 0, 10, 10], [20, 0, 30, 10]], [3, 3])]
    pred = [_pred([[0, 0, 10, 10], [50, 50, 60, 60], [20, 0, 30, 10]], [3, 3, 3], [0.9, 0.8, 0.7])]
    want = (51 + 50 * 2 / 3) / 101
    rep = M.evaluate_detections(pred, truth, CLASSES, score_threshold=0.75)
    assert rep["map"] == pytest.approx(want, abs=1e-6)
    assert rep["map_50"] == pytest.approx(want, abs=1e-6)
    assert rep["per_class"]["3"]["ap"] == pytest.approx(want, abs=1e-6)
    assert rep["per_class"]["4"] == {
        "ap": None,
        "ap_50": None,
        "ar_100": None,
        "support": 0,
        "predicted": 0,
    }
    assert rep["at_threshold"] == {
        "threshold": 0.75,
        "iou": 0.5,
        "precision": 0.5,
        "recall": 0.5,
        "f1": 0.5,
        "true_positives": 1,
        "false_positives": 1,
        "false_negatives": 1,
    }
    assert rep["sizes"]["small"] == {"boxes": 2, "images": 1}
    assert rep["pr_curve"]["score"][:3] == [0.9, 0.9, 0.9]
    assert rep["pr_curve"]["score"][51] == 0.7 and rep["pr_curve"]["precision"][51] == 0.6667
    assert rep["pr_curves"]["3"] == rep["pr_curve"] and rep["pr_curves"]["4"] is None
    stats = [M.image_stats(pred[0], truth[0])]
    assert M.map_from_stats(stats)["map"] == pytest.approx(want, abs=1e-6)
    # IoU 0.62: a hit at thresholds 0.50, 0.55, 0.60 only, so mAP = 3/10
    rep = M.evaluate_detections(
        [_pred([[0, 0, 100, 62]], [0], [0.5])], [_truth([[0, 0, 100, 100]], [0])], CLASSES
    )
    assert (rep["map"], rep["map_50"], rep["map_75"]) == (pytest.approx(0.3), 1.0, 0.0)
    assert rep["map_large"] == pytest.approx(0.3) and rep["map_small"] is None


def test_evaluate_refuses_inconsistent_input():
    truth = [_truth([[0, 0, 5, 5]], [1])]
    with pytest.raises(InvalidInput, match="2 predictions for 1 images"):
        M.evaluate_detections([_pred([], [], [])] * 2, truth, CLASSES)
    with pytest.raises(InvalidInput, match="image 0: 1 boxes, 2 scores, 1 labels"):
        M.evaluate_detections([_pred([[0, 0, 1, 1]], [1], [0.1, 0.2])], truth, CLASSES)
    with pytest.raises(InvalidInput, match=r"image 0: predicted label 10 is not a class index"):
        M.evaluate_detections([_pred([[0, 0, 1, 1]], [10], [0.1])], truth, CLASSES)
    with pytest.raises(InvalidInput, match="no images"):
        M.evaluate_detections([], [], CLASSES)


def test_report_is_json_safe_and_curves_agree(synth_truths):
    preds = _noisy(synth_truths, 1)
    rep = M.evaluate_detections(preds, synth_truths, CLASSES, score_threshold=0.5)
    assert _plain(rep), "numpy scalars or NaN leaked into the report"
    json.dumps(rep, allow_nan=False)
    assert 0.2 < rep["map"] < rep["map_50"] < 1.0
    assert sum(v["support"] for v in rep["per_class"].values()) == rep["n_truth"]
    assert sum(b["boxes"] for b in rep["sizes"].values()) == rep["n_truth"]
    for name, curve in rep["pr_curves"].items():
        if curve is not None:  # the curve's mean is the class's AP@0.5 (COCO's recall grid)
            assert np.mean(curve["precision"]) == pytest.approx(
                rep["per_class"][name]["ap_50"], abs=1e-3
            )
            scores = [s for s in curve["score"] if s is not None]
            assert scores == sorted(scores, reverse=True)


def test_fast_ap_matches_torchmetrics(synth_truths):
    """The numpy AP that the bootstrap uses equals torchmetrics' COCO mAP on a realistic set
    (jittered boxes, misses, wrong labels, false alarms), whole and by size."""
    for seed in (2, 3):
        preds = _noisy(synth_truths, seed)
        rep = M.evaluate_detections(preds, synth_truths, CLASSES)
        stats = [M.image_stats(p, t) for p, t in zip(preds, synth_truths, strict=True)]
        fast = M.map_from_stats(stats)
        for key in ("map", "map_50", "map_75", "map_small", "map_medium", "map_large"):
            assert fast[key] == pytest.approx(rep[key], abs=1e-4), key


def test_resampled_map_is_coco_on_the_resample(synth_truths):
    """A bootstrap row equals COCO's mAP on the resampled set built image by image."""
    preds = _noisy(synth_truths, 4)
    stats = [M.image_stats(p, t) for p, t in zip(preds, synth_truths, strict=True)]
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(stats), len(stats))
    weights = np.bincount(idx, minlength=len(stats))[None, :]
    fast = M.resampled_map(stats, weights)
    rep = M.evaluate_detections([preds[i] for i in idx], [synth_truths[i] for i in idx], CLASSES)
    assert fast["map"][0] == pytest.approx(rep["map"], abs=1e-5)
    assert fast["map_50"][0] == pytest.approx(rep["map_50"], abs=1e-5)


def test_choose_threshold():
    """Hits score 0.6-0.9, false alarms 0.1-0.4: the best F1 (1.0) cuts between them; a
    late hit at 0.05 is not worth the false alarms above it."""
    rng = np.random.default_rng(0)
    truths, preds = [], []
    for k in range(30):
        truths.append(_truth([[0, 0, 20, 20], [40, 40, 60, 60]], [1, 2]))
        late = k == 0
        preds.append(
            _pred(
                [[0, 0, 20, 20], [40, 40, 60, 60], [100, 100, 130, 130]],
                [1, 2, 1],
                [
                    rng.uniform(0.6, 0.9),
                    0.05 if late else rng.uniform(0.6, 0.9),
                    rng.uniform(0.1, 0.4),
                ],
            )
        )
    got = M.choose_threshold(preds, truths)
    top_fa = max(float(p["scores"][2]) for p in preds)
    low_hit = min(float(s) for p in preds for s in p["scores"][:2] if s > 0.5)
    assert top_fa < got["threshold"] < low_hit
    assert got["threshold"] == pytest.approx((top_fa + low_hit) / 2)
    assert got["precision"] == 1.0 and got["recall"] == pytest.approx(59 / 60)
    assert got["n_truth"] == 60 and got["n_predictions"] == 90
    empty = M.choose_threshold([_pred([], [], [])], [_truth([[0, 0, 1, 1]], [0])])
    assert empty["threshold"] is None and empty["f1"] == 0.0


# --------------------------------------------------------------------------- comparison


def test_compare_b_clearly_better(synth_truths):
    """B: the truth, jittered; A: B with half its boxes removed. B wins, the CI excludes 0
    and the report carries what a promotion policy reads."""
    rng = np.random.default_rng(1)
    b = []
    for t in synth_truths:
        k = len(t["labels"])
        wh = t["boxes"][:, 2:] - t["boxes"][:, :2]
        jit = t["boxes"] + rng.normal(0, 0.02, (k, 4)) * np.c_[wh, wh]
        b.append(_pred(jit, t["labels"], rng.uniform(0.5, 1.0, k)))
    a = [{key: v[::2] for key, v in p.items()} for p in b]
    rep = compare_detectors(a, b, synth_truths, CLASSES, n_boot=500, seed=0)
    assert rep["n_images"] == len(synth_truths)
    assert rep["diff"] == pytest.approx(rep["map_b"] - rep["map_a"], abs=1e-5)
    assert rep["diff"] > 0.2 and rep["ci_low"] > 0 and rep["map_50_ci_low"] > 0
    assert rep["ci_low"] <= rep["diff"] <= rep["ci_high"]
    assert rep["p_not_better"] == 0.0
    assert rep["metrics"]["map"] == {"a": rep["map_a"], "b": rep["map_b"], "diff": rep["diff"]}
    assert rep["thresholds"]["a"]["source"] == "best_f1_on_holdout"
    dis = rep["disagreement"]
    assert dis["n_disagreeing"] > 0 and len(dis["images"]) <= 12
    first = dis["images"][0]
    assert first["disagreement"] >= dis["images"][-1]["disagreement"] > 0
    assert first["ap_b"] >= first["ap_a"]
    assert {"image", "boxes_a", "boxes_b", "truth", "ap_a", "ap_b"} <= first.keys()
    assert _plain(rep)


def test_compare_same_model_is_no_difference(synth_truths):
    preds = _noisy(synth_truths, 7)
    rep = compare_detectors(
        preds,
        preds,
        synth_truths,
        CLASSES,
        n_boot=200,
        score_threshold_a=0.5,
        score_threshold_b=0.5,
    )
    assert rep["diff"] == 0.0 and rep["ci_low"] <= 0.0 <= rep["ci_high"]
    assert rep["p_not_better"] == 1.0
    assert rep["disagreement"]["n_disagreeing"] == 0 and rep["disagreement"]["images"] == []
    assert rep["thresholds"]["b"] == {"value": 0.5, "source": "given"}
    assert rep["at_threshold_a"] == rep["at_threshold_b"] == rep["report_a"]["at_threshold"]
    with pytest.raises(InvalidInput, match="same images"):
        compare_detectors(preds[:-1], preds, synth_truths, CLASSES)


def test_bootstrap_ci_covers_the_population_difference():
    """Draw 20 hold-outs of 100 images from a population of 1500; the 90% paired bootstrap CI
    of mAP(B) - mAP(A) should cover the population's difference about 90% of the time."""
    population = _random_truths(1500, seed=11)
    a = _noisy(population, 1, miss=0.25, jitter=0.1)
    b = _noisy(population, 2, miss=0.15, jitter=0.08)
    stats_a = [M.image_stats(p, t) for p, t in zip(a, population, strict=True)]
    stats_b = [M.image_stats(p, t) for p, t in zip(b, population, strict=True)]
    true_diff = M.map_from_stats(stats_b)["map"] - M.map_from_stats(stats_a)["map"]
    assert true_diff > 0.02
    rng = np.random.default_rng(0)
    covered = 0
    for k in range(20):
        idx = rng.choice(len(population), 100, replace=False)
        w = bootstrap_weights(100, n_boot=400, seed=k)
        diffs = (
            M.resampled_map([stats_b[i] for i in idx], w)["map"]
            - M.resampled_map([stats_a[i] for i in idx], w)["map"]
        )
        lo, hi = np.quantile(diffs, [0.05, 0.95])
        covered += lo <= true_diff <= hi
    assert covered >= 15, f"covered {covered}/20"


def test_bootstrap_is_fast():
    """200 images x 1000 resamples: well under a second per model on one core (the limit
    leaves room for a busy machine)."""
    truths = _random_truths(200, seed=3)
    stats = [M.image_stats(p, t) for p, t in zip(_noisy(truths, 5), truths, strict=True)]
    start = time.perf_counter()
    got = M.resampled_map(stats, bootstrap_weights(200, n_boot=1000, seed=0))
    assert time.perf_counter() - start < 3.0
    assert got["map"].shape == (1000,) and not np.isnan(got["map"]).any()
