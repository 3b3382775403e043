"""Detection in Label Studio (issue 18): the <RectangleLabels> config, pixel boxes <-> percent
rectangles, a task whose ONE prediction holds all the model's boxes, boxes annotated through
the API and pulled back (and through a webhook body), against the real Label Studio 1.23.2
`make test` starts. The conversions and the parsing are also checked offline."""

from __future__ import annotations

import json
import random
import threading
import uuid
import xml.etree.ElementTree as ET
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from helpers.labelstudio import LS_TOKEN, LS_URL, studio_client
from helpers.serving import wait_until

from quarkflow_core.errors import InvalidInput
from quarkflow_core.labelstudio import (
    DETECTION,
    LabelStudio,
    LabelStudioError,
    TaskSpec,
    boxes_to_rectangles,
    label_colour,
    parse_annotation,
    parse_webhook,
    rectangle_config,
    rectangles_to_boxes,
)

W, H = 641, 427  # odd and not square: percent of x and of y differ
TOL = 0.01  # px
CLASSES = [str(d) for d in range(10)]
PREDICTED = [
    {"label": "7", "box": [10.5, 20.25, 90.0, 140.75], "score": 0.93},
    {"label": "1", "box": [300.0, 0.0, 341.0, 427.0], "score": 0.41},
    {"label": "3", "box": [0.0, 200.125, 640.999, 260.5], "score": 0.62},
]
DRAWN = [
    {"label": "7", "box": [11.0, 19.5, 91.25, 141.0]},
    {"label": "1", "box": [299.75, 1.0, 342.0, 426.0]},
    {"label": "3", "box": [2.0, 201.0, 639.0, 259.0]},
    {"label": "0", "box": [500.0, 300.0, 600.5, 400.25]},
]


def assert_same_boxes(got: list[dict], want: list[dict], *, scored: bool = False) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g["label"] == w["label"]
        assert all(abs(a - b) <= TOL for a, b in zip(g["box"], w["box"], strict=True)), (g, w)
        if scored:
            assert abs(g["score"] - w["score"]) < 1e-9
        else:
            assert "score" not in g


# --------------------------------------------------------------------------- offline


@pytest.mark.unit
def test_boxes_become_percent_rectangles_and_come_back_exactly():
    rects = boxes_to_rectangles(PREDICTED, width=W, height=H, scored=True)
    first = rects[0]
    assert first["type"] == "rectanglelabels" and first["from_name"] == "label"
    assert first["to_name"] == "image" and first["score"] == 0.93
    assert (first["original_width"], first["original_height"]) == (W, H)
    v = first["value"]
    assert v["rectanglelabels"] == ["7"] and v["rotation"] == 0
    assert v["x"] == pytest.approx(10.5 / W * 100) and v["y"] == pytest.approx(20.25 / H * 100)
    assert v["width"] == pytest.approx(79.5 / W * 100)
    assert v["height"] == pytest.approx(120.5 / H * 100)
    assert len({r["id"] for r in rects}) == 3  # a region id each
    assert_same_boxes(rectangles_to_boxes(rects), PREDICTED, scored=True)
    unscored = boxes_to_rectangles(PREDICTED, width=W, height=H)
    assert all("score" not in r for r in unscored)

    rng = random.Random(18)
    for _ in range(200):
        w, h = rng.randint(1, 5000), rng.randint(1, 5000)
        x1, y1 = rng.uniform(0, w - 0.5), rng.uniform(0, h - 0.5)
        box = {"label": "a", "box": [x1, y1, rng.uniform(x1 + 0.01, w), rng.uniform(y1 + 0.01, h)]}
        (rect,) = boxes_to_rectangles([box], width=w, height=h)
        # the size comes from the item, else from the arguments
        assert_same_boxes(rectangles_to_boxes([rect]), [box])
        bare = {k: v for k, v in rect.items() if not k.startswith("original_")}
        assert_same_boxes(rectangles_to_boxes([bare], width=w, height=h), [box])


@pytest.mark.unit
def test_only_labelled_rectangles_count_and_rotation_gives_bounds():
    (rect,) = boxes_to_rectangles([DRAWN[0]], width=W, height=H)
    others = [
        {"type": "choices", "from_name": "label", "value": {"choices": ["7"]}},
        {"type": "rectangle", "value": {"x": 1, "y": 1, "width": 5, "height": 5}},
        {"type": "rectanglelabels", "value": {**rect["value"], "rectanglelabels": []}},
        {"type": "keypointlabels", "value": {"x": 1, "y": 1, "keypointlabels": ["7"]}},
    ]
    assert_same_boxes(rectangles_to_boxes([*others, rect]), [DRAWN[0]])
    assert rectangles_to_boxes([]) == [] and rectangles_to_boxes(None) == []
    with pytest.raises(InvalidInput, match="image size"):
        rectangles_to_boxes([{k: v for k, v in rect.items() if not k.startswith("original_")}])

    # Label Studio turns a rectangle clockwise about its top-left corner (x, y), in pixels
    def rotated(x, y, w, h, angle):
        value = {
            "x": x / 200 * 100,
            "y": y / 100 * 100,
            "width": w / 200 * 100,
            "height": h / 100 * 100,
            "rotation": angle,
            "rectanglelabels": ["5"],
        }
        item = {"type": "rectanglelabels", "value": value}
        return rectangles_to_boxes([item], width=200, height=100)[0]["box"]

    assert rotated(100, 20, 40, 10, 90) == pytest.approx([90, 20, 100, 60])
    assert rotated(100, 20, 40, 10, 180) == pytest.approx([60, 10, 100, 20])
    assert rotated(100, 20, 40, 10, 360) == pytest.approx([100, 20, 140, 30])
    s = 2**-0.5
    assert rotated(100, 20, 40, 10, 45) == pytest.approx(
        [100 - 10 * s, 20, 100 + 40 * s, 20 + 50 * s]
    )
    assert rotated(190, 90, 40, 40, 30)[2:] == pytest.approx([200, 100])  # clipped


@pytest.mark.unit
@pytest.mark.parametrize(
    ("box", "size"),
    [
        ({"label": "1", "box": [5, 5, 5, 9]}, (W, H)),  # zero width
        ({"label": "1", "box": [5, 9, 9, 4]}, (W, H)),  # y2 < y1
        ({"label": "1", "box": [5, 9, 9]}, (W, H)),
        ({"box": [1, 2, 3, 4]}, (W, H)),
        ({"label": "1", "box": [1, 2, 3, 4]}, (0, H)),
        ({"label": "1", "box": [1, 2, 3, 4]}, (None, H)),
    ],
)
def test_malformed_boxes_are_refused(box, size):
    with pytest.raises(InvalidInput):
        boxes_to_rectangles([box], width=size[0], height=size[1])


@pytest.mark.unit
def test_rectangle_config_has_every_label_in_its_own_colour():
    classes = [*CLASSES, 'a "quoted" & <odd> one']
    root = ET.fromstring(rectangle_config(classes))
    image, control = root.find("Image"), root.find("RectangleLabels")
    assert image.get("name") == "image" and image.get("value") == "$image"
    assert control.get("name") == "label" and control.get("toName") == "image"
    labels = control.findall("Label")
    assert [x.get("value") for x in labels] == classes
    assert len({x.get("background") for x in labels}) == len(classes)
    many = [label_colour(i) for i in range(200)]
    assert len(set(many)) == 200 and all(len(c) == 7 and c[0] == "#" for c in many)


def _payload(task: dict, ann: dict, action: str = "ANNOTATION_CREATED") -> dict:
    return {"action": action, "project": {"id": 5, "title": "T"}, "task": task, "annotation": ann}


@pytest.mark.unit
def test_parsing_detection_annotations_offline():
    task = {
        "id": 7,
        "project": 5,
        "data": {"image": "x", "qf_sha256": "ab" * 32, "qf_task_type": DETECTION},
    }
    ann = {
        "id": 70,
        "created_username": "ann@example.com, 3",
        "created_at": "2026-11-02T10:00:00.000000Z",
        "was_cancelled": False,
        "result": boxes_to_rectangles(DRAWN, width=W, height=H),
    }
    (got,) = parse_webhook(_payload(task, ann))
    assert got.label == "" and got.external_id == "7:70" and got.image_sha256 == "ab" * 32
    assert got.created_at is not None and got.annotator == "ann@example.com, 3"
    assert_same_boxes(got.boxes, DRAWN)
    # no boxes is an answer ("no objects"), as long as the task says it is a detection task
    nothing = parse_annotation(task, {**ann, "result": []})
    assert nothing is not None and nothing.boxes == [] and nothing.label == ""
    plain = {**task, "data": {"qf_sha256": "ab" * 32}}
    assert parse_annotation(plain, {**ann, "result": []}) is None
    assert parse_annotation(task, {**ann, "was_cancelled": True}) is None
    # rectangles without the task's marker or size: the result's own size decides
    assert_same_boxes(parse_annotation(plain, ann).boxes, DRAWN)
    # the size the task recorded serves results that lack one
    sized = {**task, "data": {**task["data"], "qf_width": W, "qf_height": H}}
    bare = [{k: v for k, v in r.items() if not k.startswith("original_")} for r in ann["result"]]
    assert_same_boxes(parse_annotation(sized, {**ann, "result": bare}).boxes, DRAWN)
    # classification is as before: the choice is the label, no boxes
    choice = [{"from_name": "label", "type": "choices", "value": {"choices": ["4"]}}]
    cls = parse_annotation(plain, {**ann, "result": choice})
    assert cls.label == "4" and cls.boxes is None
    assert parse_annotation(plain, {**ann, "result": choice}, task_type=DETECTION).boxes == []


# --------------------------------------------------------------------------- real Label Studio


@pytest.fixture(scope="module")
def studio() -> LabelStudio:
    return studio_client()


@pytest.fixture
def detection_project(studio):
    project = studio.ensure_project(f"qf-det-{uuid.uuid4().hex[:8]}", CLASSES, DETECTION)
    yield project
    studio.client.projects.delete(id=project.id)


@pytest.fixture
def hook_bodies():
    """A local address that keeps the JSON bodies posted to it (what Label Studio's webhooks
    send): (url, bodies)."""
    bodies: list[dict] = []

    class Keep(BaseHTTPRequestHandler):
        def do_POST(self):
            bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Keep)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/hook", bodies
    server.shutdown()
    server.server_close()


def _rest(path: str) -> dict:
    r = httpx.get(f"{LS_URL}/api/{path}", headers={"Authorization": f"Token {LS_TOKEN}"})
    r.raise_for_status()
    return r.json()


@pytest.mark.integration
def test_label_studio_takes_the_rectangle_config(studio, detection_project):
    project = detection_project
    assert project.task_type == DETECTION and project.classes == CLASSES
    stored = studio.client.projects.get(id=project.id)
    assert stored.label_config == rectangle_config(CLASSES)
    again = studio.ensure_project(project.title, CLASSES, DETECTION)
    assert again.id == project.id  # found, not duplicated
    more = [*CLASSES, 'a "quoted" & <odd> one']
    assert studio.ensure_project(project.title, more, DETECTION).id == project.id
    assert studio.client.projects.get(id=project.id).label_config == rectangle_config(more)
    with pytest.raises(LabelStudioError, match="is a detection project, not classification"):
        studio.ensure_project(project.title, CLASSES)
    with pytest.raises(InvalidInput, match="valid task types"):
        studio.ensure_project(project.title, CLASSES, "segmentation")


@pytest.mark.integration
def test_boxes_round_trip_through_label_studio(studio, detection_project, hook_bodies):
    project = detection_project
    hook_url, bodies = hook_bodies
    studio.add_webhook(project, hook_url, "secret")
    sha = uuid.uuid4().hex * 2
    spec = TaskSpec(
        image_sha256=sha,
        image_url="http://127.0.0.1:9/never-fetched.png",
        model_version="v3",
        boxes=PREDICTED,
        width=W,
        height=H,
    )
    task_id = studio.create_task(project, spec)
    assert studio.existing_tasks(project) == {sha: task_id}  # found again: never sent twice

    # ONE prediction holding all three boxes, in percent, with the overall (mean) score
    (pred,) = studio.client.predictions.list(task=task_id)
    assert pred.model_version == "v3"
    assert pred.score == pytest.approx(sum(b["score"] for b in PREDICTED) / 3)
    assert len(pred.result) == 3 and {r["type"] for r in pred.result} == {"rectanglelabels"}
    for r, b in zip(pred.result, PREDICTED, strict=True):
        x1, y1, x2, y2 = b["box"]
        assert r["value"]["x"] == pytest.approx(x1 / W * 100)
        assert r["value"]["y"] == pytest.approx(y1 / H * 100)
        assert r["value"]["width"] == pytest.approx((x2 - x1) / W * 100)
        assert r["value"]["height"] == pytest.approx((y2 - y1) / H * 100)
    assert_same_boxes(rectangles_to_boxes(pred.result), PREDICTED, scored=True)

    # an annotator draws four boxes; another finds nothing; a third skips the task
    drawn = studio.annotate_boxes(task_id, DRAWN, width=W, height=H)
    empty = studio.annotate_boxes(task_id, [], width=W, height=H)
    studio.client.annotations.create(id=task_id, result=[], was_cancelled=True)
    pulled = {p.annotation_id: p for p in studio.annotations(project)}
    assert set(pulled) == {drawn, empty}
    assert pulled[drawn].label == "" and pulled[drawn].image_sha256 == sha
    assert pulled[drawn].external_id == f"{task_id}:{drawn}"
    assert_same_boxes(pulled[drawn].boxes, DRAWN)
    assert pulled[empty].boxes == []

    # the webhook Label Studio sent for the four boxes gives them back too
    def hooked_now() -> dict:
        return {p.annotation_id: p for body in list(bodies) for p in parse_webhook(body)}

    wait_until(lambda: len(hooked_now()) == 2, timeout=30, what="Label Studio's webhooks")
    hooked = hooked_now()
    assert set(hooked) == {drawn, empty}  # the skipped one is left out
    assert {b["action"] for b in bodies} == {"ANNOTATION_CREATED"}
    assert hooked[drawn].external_id == pulled[drawn].external_id and hooked[drawn].label == ""
    assert hooked[drawn].image_sha256 == sha and hooked[drawn].task_id == task_id
    assert_same_boxes(hooked[drawn].boxes, DRAWN)
    assert hooked[empty].boxes == []
    # a bulk body (ANNOTATIONS_CREATED) made of what Label Studio stored
    task = _rest(f"tasks/{task_id}")
    bulk = {"action": "ANNOTATIONS_CREATED", "task": task, "annotations": task["annotations"]}
    assert {p.annotation_id for p in parse_webhook(bulk)} == {drawn, empty}


@pytest.mark.integration
def test_a_detection_task_without_boxes_or_size(studio, detection_project):
    sha = uuid.uuid4().hex * 2
    nothing = TaskSpec(sha, "http://127.0.0.1:9/x.png", score=0.2, boxes=[], width=W, height=H)
    task_id = studio.create_task(detection_project, nothing)
    (pred,) = studio.client.predictions.list(task=task_id)
    assert pred.result == [] and pred.score == pytest.approx(0.2)
    with pytest.raises(InvalidInput, match="image size"):
        studio.create_task(
            detection_project, TaskSpec(uuid.uuid4().hex * 2, "http://x/y.png", boxes=PREDICTED)
        )
    assert set(studio.existing_tasks(detection_project)) == {sha}  # nothing half-made
