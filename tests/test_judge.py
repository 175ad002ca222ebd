"""The judge loop for teacher mistakes: finding cases, the contour judge, the vlm client against a real
OpenAI-compatible HTTP server on loopback (no provider is ever called), the human review round trip,
the audit, the weighted recipe, and the trainer hook end to end on a tiny run."""

from __future__ import annotations

import base64
import json
import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import yaml

from training.judge.audit import AuditItem, audit, bucket, stratified_sample, truth_label
from training.judge.base import JudgeCase, JudgeError, crop_box, disagreements, mask_iou, swap_for
from training.judge.config import VlmJudgeConfig
from training.judge.contour import ContourJudge
from training.judge.human import FORMAT, HumanJudge, export_review, import_decisions
from training.judge.store import JudgeWeights, load_cases, save_cases
from training.judge.vlm import PROMPT_VERSION, VlmJudge, parse_answer, retry_after_seconds

API_KEY = "sk-test-not-a-real-key"


# -- cases ------------------------------------------------------------------------------------------
def _panel(h: int = 48, w: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A textured grey panel with a dark ellipse (the defect) and its exact mask."""
    rng = np.random.default_rng(seed)
    image = np.full((h, w), 170, np.uint8) + rng.integers(0, 12, (h, w), dtype=np.uint8)
    mask = np.zeros((h, w), np.uint8)
    cv2.ellipse(mask, (w // 2, h // 2), (w // 5, h // 6), 15, 0, 360, 1, -1)
    image[mask > 0] = 60
    return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR), mask.astype(bool)


def _case(student: np.ndarray, teacher: np.ndarray, crop: np.ndarray, cid: str = "e001:synthetic:7#0") -> JudgeCase:
    return JudgeCase(case_id=cid, source="synthetic:7", instance=0, crop=crop, student=student, teacher=teacher,
                     class_name="dent", disagreement=1 - mask_iou(student, teacher))  # fmt: skip


def _shift(mask: np.ndarray, dx: int, dy: int) -> np.ndarray:
    return np.roll(np.roll(mask, dy, axis=0), dx, axis=1)


def _dilate(mask: np.ndarray, px: int) -> np.ndarray:
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * px + 1, 2 * px + 1))
    return cv2.dilate(mask.astype(np.uint8), kernel) > 0


def test_disagreement_is_one_minus_iou_above_the_threshold_and_cropped_with_a_margin() -> None:
    image, truth = _panel(64, 96)
    close = _dilate(truth, 1)  # IoU ~0.8: 1 - IoU ~0.2
    far = _shift(truth, 12, 0)
    students = np.stack([truth, truth, np.zeros_like(truth), np.zeros_like(truth)])
    teachers = np.stack([truth, far, np.zeros_like(truth), truth])
    cases = disagreements(image, students, teachers, source="s", class_ids=[0, 1, 2, 1],
                          class_names=["scratch", "dent", "pinhole"], truths=np.stack([truth] * 4), margin=4, epoch=3)
    # identical and both-empty masks agree; a shift and a missing mask disagree
    assert [c.instance for c in cases] == [1, 3]
    assert cases[0].case_id == "e003:s#1" and cases[0].class_name == "dent" and cases[0].epoch == 3
    assert cases[1].disagreement == 1.0
    x, y, w, h = cases[0].box
    ys, xs = np.nonzero(truth | far)
    assert x == xs.min() - 4 and y == ys.min() - 4 and x + w == xs.max() + 1 + 4 and y + h == ys.max() + 1 + 4
    assert cases[0].crop.shape[:2] == cases[0].student.shape == cases[0].truth.shape == (h, w)
    assert np.array_equal(cases[0].crop, image[y : y + h, x : x + w])
    # the threshold is strict: 1 - IoU must exceed it
    value = 1 - mask_iou(truth, close)
    assert 0.1 < value < 0.3
    assert disagreements(image, truth[None], close[None], source="s", threshold=value) == []
    assert len(disagreements(image, truth[None], close[None], source="s", threshold=value - 1e-3)) == 1
    # crops stay inside the image and reach a minimum size
    tiny = np.zeros((40, 40), bool)
    tiny[0, 0] = True
    assert crop_box([tiny], (40, 40), margin=2) == (0, 0, 16, 16)


def test_contour_judge_prefers_the_mask_on_the_edges() -> None:
    image, truth = _panel()
    judge = ContourJudge()
    for wrong in (_shift(truth, 4, 3), _dilate(truth, 4), np.zeros_like(truth)):
        assert judge.judge(_case(truth, wrong, image)).better == "student"
        verdict = judge.judge(_case(wrong, truth, image))
        assert verdict.better == "teacher" and verdict.judge == "contour" and verdict.confidence > 0.05
        student, teacher = judge.scores(_case(wrong, truth, image))
        assert teacher > student
    assert judge.judge(_case(truth, truth.copy(), image)).better == "tie"
    flat = np.full_like(image, 128)
    assert judge.judge(_case(truth, _shift(truth, 4, 0), flat)).better == "tie"  # nothing to follow


# -- a local OpenAI-compatible server ---------------------------------------------------------------
def _answer(better: str = "A", reason: str = "A hugs the edge") -> dict[str, Any]:
    content = f'Here is my verdict: {{"better": "{better}", "confidence": 0.8, "reason": "{reason}"}} Hope it helps.'
    return {"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant",
            "content": content}, "finish_reason": "stop"}]}  # fmt: skip


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.server.requests.append({"path": self.path, "headers": dict(self.headers), "body": json.loads(body)})
        status, headers, payload, delay = self.server.script.pop(0) if self.server.script else (200, {}, _answer(), 0)
        if delay:
            time.sleep(delay)
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            pass  # the client gave up (the timeout test)

    def log_message(self, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[dict[str, Any]] = []
        self.script: list[tuple[int, dict[str, str], Any, float]] = []

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


@pytest.fixture()
def server() -> Iterator[_Server]:
    srv = _Server()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


def _vlm(server: _Server, tmp_path: Path | None = None, **changes: Any) -> tuple[VlmJudge, list[float]]:
    settings: dict[str, Any] = {
        "base_url": server.base_url, "models": ["vendor/first", "vendor/second"], "api_key_env": "JUDGE_TEST_KEY",
        "timeout_s": 5, "backoff_s": 0.01, **changes,
    }  # fmt: skip
    sleeps: list[float] = []
    cache = tmp_path / "cache.jsonl" if tmp_path is not None else None
    judge = VlmJudge(VlmJudgeConfig(**settings), cache, sleep=sleeps.append, environ={"JUDGE_TEST_KEY": API_KEY})
    return judge, sleeps


def _png(url: str) -> np.ndarray:
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix)
    data = base64.b64decode(url[len(prefix) :])
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None
    return image


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> tuple[int, dict, Any, float]:
    return status, headers or {}, {"error": {"message": message, "type": "test"}}, 0.0


def test_vlm_request_format_and_answer_mapping(server: _Server) -> None:
    image, truth = _panel()
    case = _case(truth, _shift(truth, 4, 3), image)
    judge, _ = _vlm(server, image_size=128)
    verdict = judge.judge(case)
    (request,) = server.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == f"Bearer {API_KEY}"
    assert request["headers"]["Content-Type"] == "application/json"
    body = request["body"]
    assert body["model"] == "vendor/first" and body["temperature"] == 0
    assert body["response_format"] == {"type": "json_object"} and body["max_tokens"] == 300
    system, user = body["messages"]
    assert system["role"] == "system" and isinstance(system["content"], str)
    assert user["role"] == "user" and [p["type"] for p in user["content"]] == ["text"] + ["image_url"] * 3
    crop, a, b = (_png(p["image_url"]["url"]) for p in user["content"][1:])
    assert crop.shape == a.shape == b.shape == (96, 128, 3)  # 48x64 upscaled x2 to about 128
    assert np.array_equal(crop, cv2.resize(image, None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST))
    assert not np.array_equal(a, b) and not np.array_equal(a, crop)
    # A is the student unless the case's swap bit says the teacher; "A" maps back to whichever it was
    assert verdict.better == ("teacher" if swap_for(case) else "student")
    assert verdict.judge == "vlm" and verdict.confidence == 0.8 and verdict.reason == "vendor/first: A hugs the edge"
    # the swap bit varies between cases, so neither side always sits in position A
    bits = {swap_for(_case(truth, truth, image, cid=f"e001:s#{i}")) for i in range(16)}
    assert bits == {True, False}


def test_vlm_retries_then_fails_over_to_the_next_model(server: _Server) -> None:
    image, truth = _panel()
    server.script = [_error(429, "slow"), _error(500, "oops"), _error(503, "overloaded"), (200, {}, _answer("B"), 0)]
    judge, sleeps = _vlm(server, retries=2, backoff_s=0.01, max_backoff_s=1.0)
    case = _case(truth, _shift(truth, 4, 3), image)
    verdict = judge.judge(case)
    assert [r["body"]["model"] for r in server.requests] == ["vendor/first"] * 3 + ["vendor/second"]
    assert len(sleeps) == 2 and 0.01 <= sleeps[0] <= 0.0125 and 0.02 <= sleeps[1] <= 0.025  # doubling + jitter
    assert verdict.reason.startswith("vendor/second:")
    assert verdict.better == ("student" if swap_for(case) else "teacher")  # "B"
    # a 4xx other than 401/403/408/425/429 is not retried: straight to the next model
    server.requests.clear()
    server.script = [_error(404, "no such model"), (200, {}, _answer(), 0)]
    judge, sleeps = _vlm(server)
    judge.judge(_case(truth, _shift(truth, 2, 0), image))
    assert [r["body"]["model"] for r in server.requests] == ["vendor/first", "vendor/second"] and sleeps == []


def test_vlm_honours_retry_after_within_the_cap(server: _Server) -> None:
    image, truth = _panel()
    server.script = [_error(429, "wait", {"Retry-After": "0.2"}), _error(503, "wait", {"Retry-After": "120"})]
    judge, sleeps = _vlm(server, retries=2, backoff_s=5.0, max_backoff_s=0.5)
    judge.judge(_case(truth, _shift(truth, 4, 3), image))
    assert sleeps == [0.2, 0.5]  # the server's delay replaces the backoff, capped by max_backoff_s
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0 and retry_after_seconds("soon") is None
    # and the real clock: the default sleep waits that long
    server.script = [_error(429, "wait", {"Retry-After": "0.3"})]
    judge = VlmJudge(VlmJudgeConfig(base_url=server.base_url, models=["m"], retries=1, max_backoff_s=0.3))
    started = time.monotonic()
    judge.judge(_case(truth, _shift(truth, 1, 1), image))
    assert 0.3 <= time.monotonic() - started < 3.0


def test_vlm_timeout_fails_over_and_an_endpoint_that_stays_down_is_one_line(server: _Server) -> None:
    image, truth = _panel()
    server.script = [(200, {}, _answer(), 1.5), (200, {}, _answer("tie"), 0)]
    judge, sleeps = _vlm(server, timeout_s=0.3, retries=0)
    started = time.monotonic()
    verdict = judge.judge(_case(truth, _shift(truth, 4, 3), image))
    assert time.monotonic() - started < 1.4, "the slow answer was not waited for"
    assert verdict.better == "tie" and verdict.reason.startswith("vendor/second")

    server.script = [_error(500, "first is down")] * 2 + [(200, {}, _answer(), 1.5)] * 2
    judge, sleeps = _vlm(server, timeout_s=0.3, retries=1)
    with pytest.raises(JudgeError) as info:
        judge.judge(_case(truth, _shift(truth, 3, 3), image))
    message = str(info.value)
    assert "\n" not in message and f"{server.base_url}/chat/completions" in message
    assert "vendor/first: HTTP 500 (first is down) after 2 attempts" in message
    assert "vendor/second: timed out after 0.3 s after 2 attempts" in message
    assert API_KEY not in message and len(sleeps) == 2


def test_vlm_auth_failure_stops_at_once_without_the_key(server: _Server) -> None:
    image, truth = _panel()
    server.script = [_error(401, "invalid api key")]
    judge, _ = _vlm(server)
    with pytest.raises(JudgeError, match=r"refused model vendor/first: HTTP 401.*\$JUDGE_TEST_KEY") as info:
        judge.judge(_case(truth, _shift(truth, 4, 3), image))
    assert API_KEY not in str(info.value) and len(server.requests) == 1


def test_vlm_unusable_answers_fail_over_and_text_around_json_is_tolerated(server: _Server) -> None:
    assert parse_answer('```json\n{"better": "b", "reason": "B"}\n```') == ("B", 1.0, "B")
    assert parse_answer('{"note": 1} then {"better": "TIE", "confidence": 3}')[:2] == ("tie", 1.0)
    for bad in ("I cannot tell.", '{"better": "C"}', '{"better": '):
        with pytest.raises(ValueError):
            parse_answer(bad)
    image, truth = _panel()
    server.script = [(200, {}, _answer("maybe"), 0), (200, {}, {"choices": []}, 0), (200, {}, _answer("A"), 0)]
    judge, _ = _vlm(server, models=["m1", "m2", "m3"])
    assert judge.judge(_case(truth, _shift(truth, 4, 3), image)).reason.startswith("m3:")


def test_vlm_cache_answers_a_repeated_case_without_a_request(server: _Server, tmp_path: Path) -> None:
    image, truth = _panel()
    case = _case(truth, _shift(truth, 4, 3), image)
    judge, _ = _vlm(server, tmp_path)
    first = judge.judge(case)
    again = judge.judge(case)
    fresh, _ = _vlm(server, tmp_path)  # a new process reads the file
    later = fresh.judge(_case(truth, _shift(truth, 4, 3), image, cid=case.case_id))
    assert len(server.requests) == 1 and judge.requests == 1 and fresh.requests == 0
    assert first.better == again.better == later.better and later.reason == first.reason
    lines = (tmp_path / "cache.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["prompt"] == PROMPT_VERSION and API_KEY not in lines[0]
    # another model list, another key: asked again
    other, _ = _vlm(server, tmp_path, models=["vendor/second"])
    other.judge(case)
    assert len(server.requests) == 2
    # a torn last line (a crash mid-write) is skipped
    with (tmp_path / "cache.jsonl").open("a") as f:
        f.write('{"key": "abc", "bet')
    assert len(_vlm(server, tmp_path)[0].cache or []) == 2


# -- human review -----------------------------------------------------------------------------------
def test_review_page_round_trip_and_bad_decision_files(tmp_path: Path) -> None:
    image, truth = _panel()
    cases = [_case(truth, _shift(truth, i + 2, 0), image, cid=f"e002:synthetic:{i}#0") for i in range(4)]
    page = export_review(cases, tmp_path / "review.html")
    text = page.read_text()
    assert text.count('<tr class="case"') == 4 and "download decisions" in text
    assert not re.search(r"(src|href)=\"(https?:)?//", text), "self-contained: nothing fetched from elsewhere"
    assert text.count('src="data:image/png;base64,') == 12
    rows = re.findall(r'data-case-id="([^"]+)" data-a="(student|teacher)"', text)
    assert [cid for cid, _ in rows] == [c.case_id for c in cases]
    # What the page's script does: the reviewer picks A, B, tie, (nothing); A/B map back through data-a.
    picks = ["A", "B", "tie", None]
    decisions = []
    for (cid, a), pick in zip(rows, picks, strict=True):
        if pick is not None:
            b = "teacher" if a == "student" else "student"
            decisions.append({"case_id": cid, "better": {"A": a, "B": b, "tie": "tie"}[pick], "note": " ok "})
    path = tmp_path / "decisions.json"
    path.write_text(json.dumps({"format": FORMAT, "page": "x", "decisions": decisions}))
    verdicts = import_decisions(path, known={c.case_id for c in cases})
    assert set(verdicts) == {c.case_id for c in cases[:3]}
    assert verdicts[cases[0].case_id].better == ("teacher" if swap_for(cases[0]) else "student")
    assert verdicts[cases[2].case_id].better == "tie" and verdicts[cases[2].case_id].reason == "ok"
    human = HumanJudge(verdicts)
    assert human.judge(cases[3]).abstain and human.judge(cases[0]) == verdicts[cases[0].case_id]
    weights = JudgeWeights({"synthetic:7": {0: 2.0}})
    weights.apply([human.judge(cases[3])], {c.case_id: c for c in cases}, 2.0)
    assert len(weights) == 1, "a case nobody reviewed changes no weight"

    def bad(content: str, pattern: str) -> None:
        path.write_text(content)
        with pytest.raises(JudgeError, match=pattern) as info:
            import_decisions(path, known={c.case_id for c in cases})
        assert "\n" not in str(info.value) and str(path) in str(info.value)

    bad("{not json", "not a JSON decisions file")
    bad(json.dumps({"decisions": []}), "expected .*format")
    one = {"case_id": cases[0].case_id, "better": "student"}
    bad(json.dumps({"format": FORMAT, "decisions": [one, {"case_id": "e009:nowhere#1", "better": "tie"}]}),
        "unknown case ids 'e009:nowhere#1'")
    bad(json.dumps({"format": FORMAT, "decisions": [{**one, "better": "A"}]}), "bad decision 'A'")
    bad(json.dumps({"format": FORMAT, "decisions": [one, one]}), "decided twice")
    with pytest.raises(JudgeError, match="cannot be read"):
        import_decisions(tmp_path / "missing.json")


def test_cases_and_weights_round_trip(tmp_path: Path) -> None:
    image, truth = _panel()
    cases = [_case(truth, _shift(truth, 3, 0), image, cid="e001:a#0"),
             JudgeCase("e001:b#2", "b", 2, image[:10, :12].copy(), truth[:10, :12], truth[:10, :12].copy(),
                       truth=truth[:10, :12].copy())]  # fmt: skip
    save_cases(tmp_path / "cases.npz", cases)
    loaded = load_cases(tmp_path / "cases.npz")
    assert [c.case_id for c in loaded] == ["e001:a#0", "e001:b#2"] and loaded[0].truth is None
    for x, y in zip(cases, loaded, strict=True):
        assert np.array_equal(x.crop, y.crop) and np.array_equal(x.teacher, y.teacher)
    weights = JudgeWeights()
    weights.set("a", 0, 2.0)
    weights.set("b", 2, 3.0)
    weights.set("b", 2, 1.0)  # back to 1: removed
    weights.save(tmp_path / "w.json")
    again = JudgeWeights.load(tmp_path / "w.json")
    assert len(again) == 1 and again.get("a", 2).tolist() == [2.0, 1.0] and again.get("b", 3).tolist() == [1, 1, 1]


# -- audit ------------------------------------------------------------------------------------------
def test_audit_stratifies_and_counts_agreement() -> None:
    items = []
    # scratch, mild disagreements: 10 verdicts, 8 right; dent, gross: 4 verdicts, 1 right
    for i in range(10):
        items.append(AuditItem(f"s{i}", "scratch", 0.2, "student", "student" if i < 8 else "teacher"))
    for i in range(4):
        items.append(AuditItem(f"d{i}", "dent", 0.7, "teacher", "teacher" if i == 0 else "tie"))
    report = audit(items, reference="ground truth", per_stratum=None)
    assert report.sampled == report.population == 14 and report.agreed == 9
    assert report.agreement == pytest.approx(9 / 14) and report.weighted_agreement == pytest.approx(9 / 14)
    assert report.strata[("scratch", "0.15-0.30")] == {"population": 10, "sampled": 10, "agreed": 8}
    assert report.confusion["teacher"] == {"teacher": 1, "tie": 3}
    # four per stratum: every stratum is represented, the estimate weights them by population
    sample = stratified_sample(items, 4, seed=1)
    assert len(sample) == 8 and sum(it.class_name == "dent" for it in sample) == 4
    small = audit(items, reference="ground truth", per_stratum=4, seed=1)
    scratch_rate = small.strata[("scratch", "0.15-0.30")]["agreed"] / 4
    assert small.weighted_agreement == pytest.approx((10 * scratch_rate + 4 * 0.25) / 14)
    assert "agreement" in small.format() and small.as_dict()["sampled"] == 8
    assert [bucket(x) for x in (0.1, 0.15, 0.3, 0.31, 0.99)] == ["<0.15", "<0.15", "0.15-0.30", "0.30-0.50",
                                                                  "0.50-1.00"]  # fmt: skip
    _, truth = _panel()
    assert truth_label(truth, _shift(truth, 5, 0), truth) == "student"
    assert truth_label(_dilate(truth, 5), truth, truth) == "teacher"
    assert truth_label(truth, truth, truth) == "tie"


# -- the weighted recipe and the trainer hook -------------------------------------------------------
@pytest.fixture()
def torch() -> Iterator[Any]:
    """torch (the 'train' extra), on one thread for the test: on a busy 2-core machine, two threads per
    operation made these tests ten times slower."""
    module = pytest.importorskip("torch")
    threads = module.get_num_threads()
    module.set_num_threads(1)
    try:
        yield module
    finally:
        module.set_num_threads(threads)


SYNTH = {"name": "synthetic", "width": 128, "height": 72, "pixel_scale": 0.5, "defect_free_prob": 0.0}


def test_judged_recipe_equals_blog_at_weight_one_and_reweights_per_instance(torch: Any) -> None:
    from training.config import RecipeConfig
    from training.data.prepare import PreparedDataset, collate
    from training.data.synthetic import SyntheticDataset
    from training.judge.weighting import judged_recipe
    from training.model.build import build_model
    from training.recipes import build_recipe
    from training.teachers.family import FamilyTeacher
    from training.trainer import flatten_prompts

    torch.manual_seed(0)
    samples = SyntheticDataset(2, seed=5, width=128, height=72, pixel_scale=0.5, defect_free_prob=0.0)
    batch = collate([PreparedDataset(samples, height=64, width=128, train=False)[i] for i in range(2)])
    flatten_prompts(batch)
    teacher = FamilyTeacher(build_model("teacher_cnn", height=64, width=128, k=2), "teacher_cnn", "f" * 64)
    with torch.no_grad():
        out = teacher.predict(batch["image"], batch["prompts"], batch["image_index"])
    batch.update(teacher_embedding=out.embedding, teacher_logits=out.mask_logits)
    student = build_model("student_cnn", height=64, width=128, k=2).eval()
    plain = build_recipe("blog", student, RecipeConfig(), teacher)
    judged = judged_recipe(plain)
    base_loss, base_parts = plain(batch)
    ones = torch.ones(batch["instance_valid"].shape)
    loss, parts = judged({**batch, "judge_weight": ones})
    assert torch.allclose(loss, base_loss) and float(parts["judge_reweighted"]) == 0.0
    weight = ones.clone()
    weight[0, 0] = 2.0  # the first instance: the judge favoured the student
    loss2, parts2 = judged({**batch, "judge_weight": weight})
    m = int(batch["instance_valid"].sum())
    assert float(parts2["judge_reweighted"]) == pytest.approx(1 / m)
    assert torch.allclose(parts2["dice"], base_parts["dice"]), "reported parts stay unweighted"
    # the change is exactly: dice of instance 0 counted once more, its soft-mask term half as much
    from training.losses import dice_loss, soft_mask_bce, upsample_logits

    with torch.no_grad():
        logits, _ = plain.masks(*student.embed(batch["image"]), batch)
        full = upsample_logits(logits, (64, 128))
        d0 = dice_loss(full[:1], batch["targets"][:1])
        s0 = soft_mask_bce(logits[:1], batch["teacher_logits"][:1])
    expected = base_loss + 0.3 * (d0 / m) - 0.3 * (0.5 * s0 / m)
    assert torch.allclose(loss2, expected, atol=1e-5)


def _config(tmp_path: Path, **judge: Any) -> dict[str, Any]:
    """A tiny blog run with a cached family teacher (random weights) and the contour judge at threshold 0."""
    import torch

    from training.model.build import build_model
    from training.model.checkpoint import save_checkpoint

    teacher = tmp_path / "teacher.pt"
    if not teacher.exists():
        torch.manual_seed(0)
        save_checkpoint(teacher, "teacher_cnn", build_model("teacher_cnn", height=64, width=128))
    return {
        "name": "tiny", "out": str(tmp_path / "run"), "seed": 0,
        "model": {"arch": "student_cnn", "height": 64, "width": 128, "k": 2},
        "data": {"train": [{**SYNTH, "n": 4, "seed": 0}]},
        "teacher": {"kind": "family", "checkpoint": str(teacher), "cache": str(tmp_path / "cache")},
        "recipe": {"name": "blog"}, "schedule": {"epochs": 2, "batch_size": 4, "lr": 0.002},
        "eval": {"metric": "loss"}, "judge": {"kind": "contour", "threshold": 0.0, **judge},
    }  # fmt: skip


def test_judge_config_keys_and_errors(tmp_path: Path, torch: Any) -> None:
    from training.config import ConfigError, load_config, parse_config, reference

    assert parse_config({**_config(tmp_path), "judge": {}}).judge.kind == "none"
    text = reference()
    for key in ("judge.kind", "judge.threshold", "judge.weight", "judge.vlm.base_url", "judge.vlm.models",
                "judge.vlm.timeout_s", "judge.vlm.retries", "judge.vlm.cache", "judge.contour.tie_margin"):
        assert f"`{key}`" in text, key

    def fails(raw: dict[str, Any], pattern: str) -> None:
        path = tmp_path / "cfg.yaml"
        path.write_text(yaml.safe_dump(raw))
        with pytest.raises(ConfigError, match=pattern):
            load_config(path)

    fails(_config(tmp_path, threshold=1.5), r"key 'judge\.threshold'")
    fails(_config(tmp_path, kind="oracle"), r"key 'judge\.kind'")
    fails(_config(tmp_path, kind="vlm"), r"key 'judge'.*vlm\.base_url")
    fails(_config(tmp_path, kind="vlm", vlm={"base_url": "ftp://x", "models": ["m"]}), r"judge\.vlm.*http://")
    fails(_config(tmp_path, vlm={"retry": 3}), r"key 'judge\.vlm\.retry'")
    fails({**_config(tmp_path), "recipe": {"name": "mobilesam"}}, "judge.kind 'contour' needs recipe blog")


def test_trainer_hook_writes_weights_and_the_next_epochs_use_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], torch: Any
) -> None:
    from training.cli import main
    from training.config import parse_config
    from training.judge import loop
    from training.judge.base import Verdict
    from training.trainer import train

    class StudentAlways:
        """A judge that always favours the student, so the re-weighting is certain to show."""

        name = "always-student"

        def judge(self, case: JudgeCase) -> Verdict:
            return Verdict(case.case_id, "student", 1.0, self.name, "test")

    monkeypatch.setattr(loop, "build_judge", lambda config, run, kind=None: StudentAlways())
    run = tmp_path / "run"
    train(parse_config(_config(tmp_path, weight=3.0)), log=lambda m: None)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    log = [json.loads(line) for line in (run / "judge" / "log.jsonl").read_text().splitlines()]
    weights = json.loads((run / "judge" / "weights.json").read_text())["instances"]
    # judged after epoch 1 only (never after the last); every case favoured the student -> weight 3
    assert records[0]["judge_judged"] == len(log) > 0 and "judge_judged" not in records[1]
    assert {r["epoch"] for r in log} == {1} and all(r["better"] == "student" and r["weight"] == 3.0 for r in log)
    assert {"iou_student_gt", "iou_teacher_gt", "truth_better"} <= set(log[0])
    assert sum(len(v) for v in weights.values()) == len(log)
    assert all(w == 3.0 for v in weights.values() for w in v.values())
    # epoch 1 trained unweighted; epoch 2 with the weights
    assert records[0]["train_judge_reweighted"] == 0.0 < records[1]["train_judge_reweighted"]
    assert (run / "judge" / "cases-e001.npz").is_file()

    # resuming reads the weights back: the third epoch trains with them too
    train(parse_config({**_config(tmp_path, weight=3.0), "schedule": {"epochs": 3, "batch_size": 4, "lr": 0.002}}),
          log=lambda m: None)  # fmt: skip
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[2]["epoch"] == 3 and records[2]["train_judge_reweighted"] > 0

    # offline: re-judge the stored cases with the real contour judge, audit, review page, decisions back
    capsys.readouterr()
    assert main(["judge", "--run", str(run), "--kind", "contour"]) == 0
    out = capsys.readouterr().out
    assert f"of {len(log)} cases of epoch 1 judged" in out and "audit against ground truth" in out
    assert (run / "judge" / "verdicts-contour-e001.jsonl").is_file()
    assert main(["judge", "--run", str(run), "--audit", "--per-stratum", "2"]) == 0
    assert "agreement" in capsys.readouterr().out
    page = tmp_path / "review.html"
    assert main(["judge", "--run", str(run), "--kind", "human", "--export", str(page)]) == 0
    first = re.search(r'data-case-id="([^"]+)"', page.read_text())
    assert first is not None
    decided = tmp_path / "decisions.json"
    decided.write_text(json.dumps({"format": FORMAT, "decisions": [{"case_id": first.group(1), "better": "teacher"}]}))
    assert main(["judge", "--run", str(run), "--kind", "human", "--import", str(decided)]) == 0
    out = capsys.readouterr().out
    assert "imported 1 decisions" in out and "audit against reviewer" in out
    after = json.loads((run / "judge" / "weights.json").read_text())["instances"]
    assert sum(len(v) for v in after.values()) == len(log) - 1, "the teacher-favoured instance is back to 1"
    decided.write_text(json.dumps({"format": FORMAT, "decisions": [{"case_id": "e001:nope#0", "better": "tie"}]}))
    assert main(["judge", "--run", str(run), "--kind", "human", "--import", str(decided)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown case ids 'e001:nope#0'" in err


def test_judge_is_off_by_default_and_the_cli_has_help(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], torch: Any
) -> None:
    from training.cli import main
    from training.config import parse_config

    config = parse_config({k: v for k, v in _config(tmp_path).items() if k != "judge"})
    assert config.judge.kind == "none"
    with pytest.raises(SystemExit) as info:
        main(["judge", "--help"])
    assert info.value.code == 0 and "--kind" in capsys.readouterr().out
    assert main(["judge", "--run", str(tmp_path), "--audit"]) == 2
    assert "no judge/ directory" in capsys.readouterr().err
