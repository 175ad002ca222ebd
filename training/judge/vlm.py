"""A vision-language model as judge, through any OpenAI-compatible chat-completions endpoint.

One request per case: ``POST {base_url}/chat/completions`` with a system prompt and a user message
holding the question and three PNG images as data URIs: the crop, mask A drawn on it, mask B drawn
on it. Which of student and teacher is A is a fixed pseudo-random bit per case (``swap_for``), so
neither sits first every time (models favour a position); the answer is mapped back. The answer
must hold a JSON object ``{"better": "A" | "B" | "tie", "confidence": 0..1, "reason": "..."}``;
text around it is tolerated. ``temperature`` is 0, and ``response_format`` asks for JSON
(``json_mode``).

Endpoints: a Bifrost gateway (``http://HOST:8080/v1``, models named ``provider/model``, e.g.
``openai/gpt-4o-mini``), vLLM, Ollama's ``/v1``, or a provider's own API. The bearer API key is read
from the environment variable named by ``api_key_env`` and is never written anywhere.

Failures: 429, 408, 425 and 5xx answers, timeouts and connection errors are retried on the same
model after an exponential delay (``backoff_s`` x 2^retry, plus up to 25% jitter, at most
``max_backoff_s``); a ``Retry-After`` header (seconds or an HTTP date) replaces that delay, also
capped. After ``retries`` retries, or at once on another 4xx or an unreadable answer, the next
model of ``models`` is tried. 401/403 stop at once (a key problem is not a model problem). When
every model fails the JudgeError names the endpoint and each model's last failure on one line.

Verdicts are cached on disk (``VerdictCache``, JSON lines), keyed by the SHA-256 of the model list,
the prompt version, the image size and the case's pixels and masks; a repeated case costs no request.
"""

from __future__ import annotations

import email.utils
import fcntl
import hashlib
import http.client
import json
import os
import random
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from training.judge.base import Better, JudgeCase, JudgeError, Verdict
from training.judge.config import VlmJudgeConfig
from training.judge.images import case_pngs, data_uri

PROMPT_VERSION = "defectsam-judge-vlm/1"
SYSTEM_PROMPT = (
    "You are a quality engineer reviewing segmentation masks of surface defects on manufactured parts. "
    "You compare two candidate masks of the same defect and judge only how well each follows the defect's "
    "visible contour. You answer with a single JSON object and nothing else."
)
USER_PROMPT = (
    "Image 1 is a crop of an inspected surface around one defect. Image 2 shows the same crop with candidate "
    "mask A, image 3 with candidate mask B; each mask is tinted and outlined in cyan. Which mask follows the "
    "defect's visible contour more closely: covering the defect without missing parts of it and without "
    "spilling onto clean surface? If both fit equally well or equally badly, answer tie. Reply with only: "
    '{"better": "A" | "B" | "tie", "confidence": <number from 0 to 1>, "reason": "<one short sentence>"}'
)
RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
AUTH_STATUS = frozenset({401, 403})
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


class _FailureError(Exception):
    def __init__(self, detail: str, *, retryable: bool, retry_after: float | None = None, auth: bool = False) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retryable = retryable
        self.retry_after = retry_after
        self.auth = auth


def retry_after_seconds(value: str | None) -> float | None:
    """A Retry-After header (delta seconds or an HTTP date) -> seconds from now, or None."""
    if not value:
        return None
    try:
        return max(0.0, float(value.strip()))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def parse_answer(text: str) -> tuple[str, float, str]:
    """The first JSON object in ``text`` holding "better" -> ("A" | "B" | "tie", confidence, reason).

    ValueError when there is none or its "better" is something else.
    """
    decoder = json.JSONDecoder()
    for start, char in enumerate(text):
        if char != "{":
            continue
        try:
            obj, _ = decoder.raw_decode(text, start)
        except ValueError:
            continue
        if not isinstance(obj, dict) or "better" not in obj:
            continue
        raw = str(obj["better"]).strip()
        better = raw.upper() if raw.upper() in ("A", "B") else raw.lower()
        if better not in ("A", "B", "tie"):
            raise ValueError(f"'better' is {raw!r}, expected A, B or tie")
        try:
            confidence = float(obj.get("confidence", 1.0 if better != "tie" else 0.5))
        except (TypeError, ValueError):
            confidence = 0.5
        return better, min(1.0, max(0.0, confidence)), " ".join(str(obj.get("reason", "")).split())[:300]
    raise ValueError("no JSON object with a 'better' key in the answer")


def _content(payload: Any) -> str:
    """choices[0].message.content of a chat-completions response (a string or a list of text parts)."""
    try:
        content = payload["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise ValueError("no choices[0].message.content in the response") from None
    if isinstance(content, list):
        content = "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    if not isinstance(content, str):
        raise ValueError("choices[0].message.content is not text")
    return content


def _snippet(data: bytes, limit: int = 160) -> str:
    """A server's error body on one short line (OpenAI-style {"error": {"message"}} when there is one)."""
    text = data.decode("utf-8", "replace")
    try:
        error = json.loads(text).get("error")
        text = str(error.get("message", error)) if isinstance(error, dict) else str(error or text)
    except (ValueError, AttributeError):
        pass
    text = " ".join(text.split())
    return text[:limit] + ("..." if len(text) > limit else "")


class VerdictCache:
    """Verdicts on disk, one JSON object per line, appended under an exclusive lock.

    Each line is written with one ``write`` on an ``O_APPEND`` descriptor while holding ``flock``, so
    concurrent writers never interleave; a torn last line (a crash mid-write) is skipped on load.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._entries: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and isinstance(record.get("key"), str):
                    self._entries[record["key"]] = record

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> dict[str, Any] | None:
        return self._entries.get(key)

    def put(self, key: str, record: Mapping[str, Any]) -> None:
        entry = {"key": key, **record}
        line = (json.dumps(entry, sort_keys=True) + "\n").encode("utf-8")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, line)
        finally:
            os.close(fd)  # closing releases the lock
        self._entries[key] = entry


class VlmJudge:
    """The ``vlm`` judge: see the module docstring."""

    name = "vlm"

    def __init__(
        self,
        config: VlmJudgeConfig,
        cache: VerdictCache | Path | str | None = None,
        *,
        sleep: Callable[[float], None] = time.sleep,
        environ: Mapping[str, str] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if not config.base_url or not config.models:
            raise JudgeError("vlm judge: needs vlm.base_url and at least one model in vlm.models")
        self.config = config
        self.url = config.base_url.rstrip("/") + "/chat/completions"
        self.models = list(config.models)
        self.cache = VerdictCache(cache) if isinstance(cache, Path | str) else cache
        self._sleep = sleep
        self._rng = rng or random.Random()
        env = os.environ if environ is None else environ
        self._api_key = env.get(config.api_key_env, "")
        host = urllib.parse.urlparse(self.url).hostname or ""
        # A proxy cannot reach this machine's loopback: talk to a local gateway directly.
        proxies = urllib.request.ProxyHandler({}) if host in _LOOPBACK else urllib.request.ProxyHandler()
        self._opener = urllib.request.build_opener(proxies)
        self.requests = 0  # HTTP requests sent (cache hits send none)

    # -- pieces ------------------------------------------------------------------------------
    def key(self, case: JudgeCase) -> str:
        material = json.dumps(
            {"models": self.models, "prompt": PROMPT_VERSION, "size": self.config.image_size, "case": case.digest()},
            sort_keys=True,
        )
        return hashlib.sha256(material.encode()).hexdigest()

    def request_body(self, model: str, images: tuple[bytes, bytes, bytes]) -> dict[str, Any]:
        crop, a, b = images
        body: dict[str, Any] = {
            "model": model,
            "messages": [
                {"role": "system", "content": SYSTEM_PROMPT},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": USER_PROMPT},
                        {"type": "image_url", "image_url": {"url": data_uri(crop)}},
                        {"type": "image_url", "image_url": {"url": data_uri(a)}},
                        {"type": "image_url", "image_url": {"url": data_uri(b)}},
                    ],
                },
            ],
            "temperature": 0,
            "max_tokens": self.config.max_tokens,
        }
        if self.config.json_mode:
            body["response_format"] = {"type": "json_object"}
        return body

    def delay(self, retry: int, retry_after: float | None) -> float:
        """Seconds to wait before retry number ``retry`` + 1 (0-based): Retry-After, else exponential + jitter."""
        cap = self.config.max_backoff_s
        if retry_after is not None:
            return min(cap, retry_after)
        return min(cap, self.config.backoff_s * (2**retry) * (1.0 + 0.25 * self._rng.random()))

    def _post(self, body: bytes) -> str:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        timeout = self.config.timeout_s
        self.requests += 1
        try:
            with self._opener.open(request, timeout=timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            status = exc.code
            detail = f"HTTP {status}"
            body_text = _snippet(exc.read() or b"")
            if body_text:
                detail += f" ({body_text})"
            raise _FailureError(
                detail, retryable=status in RETRY_STATUS, auth=status in AUTH_STATUS,
                retry_after=retry_after_seconds(exc.headers.get("Retry-After") if exc.headers else None),
            ) from None
        except TimeoutError:
            raise _FailureError(f"timed out after {timeout:g} s", retryable=True) from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, TimeoutError):
                raise _FailureError(f"timed out after {timeout:g} s", retryable=True) from None
            raise _FailureError(f"connection failed ({exc.reason})", retryable=True) from None
        except (http.client.HTTPException, OSError) as exc:
            raise _FailureError(f"connection failed ({type(exc).__name__}: {exc})", retryable=True) from None
        try:
            return _content(json.loads(raw))
        except ValueError as exc:
            raise _FailureError(f"unusable response ({exc})", retryable=False) from None

    # -- the judge ---------------------------------------------------------------------------
    def judge(self, case: JudgeCase) -> Verdict:
        key = self.key(case)
        hit = self.cache.get(key) if self.cache is not None else None
        if hit is not None:
            return Verdict(case.case_id, hit["better"], float(hit["confidence"]), self.name, str(hit.get("reason", "")))
        crop, a, b, swapped = case_pngs(case, self.config.image_size)
        failures: list[str] = []
        for model in self.models:
            body = json.dumps(self.request_body(model, (crop, a, b))).encode("utf-8")
            for attempt in range(self.config.retries + 1):
                try:
                    answer, confidence, reason = parse_answer(self._post(body))
                except _FailureError as failure:
                    if failure.auth:
                        raise JudgeError(
                            f"vlm judge: {self.url} refused model {model}: {failure.detail}; "
                            f"check the API key in ${self.config.api_key_env}"
                        ) from None
                    if failure.retryable and attempt < self.config.retries:
                        self._sleep(self.delay(attempt, failure.retry_after))
                        continue
                    tries = f" after {attempt + 1} attempts" if attempt else ""
                    failures.append(f"{model}: {failure.detail}{tries}")
                    break
                except ValueError as exc:
                    failures.append(f"{model}: unusable answer ({exc})")
                    break
                better = _map_back(answer, swapped)
                reason = f"{model}: {reason}" if reason else model
                if self.cache is not None:
                    self.cache.put(key, {
                        "better": better, "confidence": confidence, "reason": reason, "model": model,
                        "prompt": PROMPT_VERSION, "case_id": case.case_id,
                    })  # fmt: skip
                return Verdict(case.case_id, better, confidence, self.name, reason)
        raise JudgeError(f"vlm judge: every model failed at {self.url}: " + "; ".join(failures))


def _map_back(answer: str, swapped: bool) -> Better:
    """"A"/"B"/"tie" -> student/teacher/tie; ``swapped``: A showed the teacher's mask."""
    if answer == "tie":
        return "tie"
    is_a = answer == "A"
    return "teacher" if is_a == swapped else "student"
