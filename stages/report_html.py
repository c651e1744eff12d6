"""The report's pages: HTML from jinja2 templates, every image embedded as a data URI so one page is one file that can
be mailed or attached to a ticket. Figures use matplotlib's object API (no pyplot), images OpenCV's encoders."""
from __future__ import annotations

import base64
from pathlib import Path

import cv2
import jinja2
import numpy as np
from matplotlib.figure import Figure

from .explain import ClipExplanation

TRACK_COLOURS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)]
STRIP_HEIGHT = 160
STATUS_TEXT = {"no_face": "No face was found", "undecodable": "The video could not be decoded",
               "empty": "The video holds no frame", "error": "Scoring failed"}

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse}td,th{padding:4px 8px;border-bottom:1px solid #ddd;text-align:left;vertical-align:middle}
.bar{background:#eee;width:160px;height:12px;position:relative;display:inline-block;vertical-align:middle}
.bar span{position:absolute;left:0;top:0;bottom:0}.bar i{position:absolute;top:-2px;bottom:-2px;border-left:2px solid #000}
.fake{color:#b00;font-weight:600}.real{color:#070;font-weight:600}.wrong{background:#fff1f0}
.note{background:#fff7e0;padding:.6em;border-left:4px solid #e0a000}
.faces td{vertical-align:top}img{display:block}figure{display:inline-block;margin:0 .6em .6em 0}
figcaption{font-size:85%;color:#555}
"""

_ENV = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)

VIDEO_TEMPLATE = _ENV.from_string("""<!doctype html>
<html><head><meta charset="utf-8"><title>{{ title }}: dfpipe report</title><style>{{ style }}</style></head><body>
<p><a href="../index.html">&larr; all videos</a></p>
<h1>{{ title }}</h1>
<p><code>{{ row.path }}</code></p>
<table>
<tr><th>status</th><td>{{ row.status }}{% if row.reason %} ({{ row.reason }}){% endif %}</td></tr>
<tr><th>score</th><td>{% if row.score is not none %}{{ "%.4f"|format(row.score) }}
 <span class="bar"><span style="width:{{ (row.score * 100)|round(1) }}%;background:{{ bar_colour }}"></span><i style="left:{{ (threshold * 100)|round(1) }}%"></i></span>{% else %}none{% endif %}</td></tr>
<tr><th>threshold</th><td>{{ "%.4f"|format(threshold) }}</td></tr>
<tr><th>verdict</th><td>{% if row.label %}<span class="{{ row.label }}">{{ row.label }}</span>{% else %}none{% endif %}</td></tr>
{% if true_label %}<tr><th>true label</th><td><span class="{{ true_label }}">{{ true_label }}</span>{% if wrong %} &mdash; misclassified{% endif %}</td></tr>{% endif %}
<tr><th>frames</th><td>{{ row.frames_sampled }} sampled, {{ row.frames_with_face }} with a face; {{ row.get("tracks", 0) }} face track(s), {{ row.get("clips", 0) }} clips scored</td></tr>
</table>
{% if status_text %}<p class="note">{{ status_text }}{% if row.reason %}: {{ row.reason }}{% endif %}.</p>{% endif %}
{% if note %}<p class="note">{{ note }}</p>{% endif %}
{% if timelines %}<h2>Clip probability over time, per face track</h2>
{% for t in timelines %}<figure><img src="{{ t.image }}" alt="timeline of track {{ t.track }}"><figcaption>track {{ t.track }}: score {{ "%.4f"|format(t.score) }} from its {{ t.clips }} clips</figcaption></figure>
{% endfor %}{% endif %}
{% if faces %}<h2>Most suspicious faces</h2>
<p>Each clip's face as the model saw it (HQ crop, the clip's frame with the strongest heatmap), beside the same crop
with its Grad-CAM heatmap (where the HQ stream's features pushed this clip towards <em>fake</em>; red is most), and how
much the fusion trusted each stream.</p>
<table class="faces"><tr><th>clip</th><th>HQ crop</th><th>Grad-CAM</th><th>streams</th></tr>
{% for f in faces %}<tr><td>track {{ f.track }}<br>frames {{ f.first }}&ndash;{{ f.last }}<br>{% if f.seconds is not none %}{{ "%.2f"|format(f.seconds) }} s<br>{% endif %}P(fake) {{ "%.4f"|format(f.probability) }}</td>
<td><img src="{{ f.crop }}" alt="face crop"><figcaption>frame {{ f.shown }}</figcaption></td><td><img src="{{ f.heatmap }}" alt="Grad-CAM heatmap"></td>
<td>HQ {{ "%.0f"|format(f.hq * 100) }}%<br>LQ {{ "%.0f"|format(f.lq * 100) }}%</td></tr>
{% endfor %}</table>{% endif %}
{% if strip %}<h2>Frames</h2>
{% for s in strip %}<figure><img src="{{ s.image }}" alt="frame {{ s.frame }}"><figcaption>frame {{ s.frame }}{% if s.tracks %}: track {{ s.tracks|join(", ") }}{% endif %}</figcaption></figure>
{% endfor %}{% endif %}
</body></html>
""")

INDEX_TEMPLATE = _ENV.from_string("""<!doctype html>
<html><head><meta charset="utf-8"><title>{{ title }}: dfpipe report</title><style>{{ style }}</style></head><body>
<h1>{{ title }}</h1>
<p>{{ rows|length }} videos; threshold {{ threshold }}.{% if labelled %} {{ wrong }} of {{ labelled }} labelled videos misclassified (listed first).{% endif %}</p>
{% if plots %}<h2>Metrics</h2>
{% for p in plots %}<figure><img src="{{ p.image }}" width="375" alt="{{ p.name }}"><figcaption>{{ p.name }}</figcaption></figure>{% endfor %}
{% endif %}
<h2>Videos</h2>
<table><tr><th></th><th>video</th><th>score</th><th>verdict</th>{% if labelled %}<th>true label</th>{% endif %}<th>status</th></tr>
{% for r in rows %}<tr{% if r.wrong %} class="wrong"{% endif %}>
<td>{% if r.thumb %}<img src="{{ r.thumb }}" width="56" height="56" alt="">{% endif %}</td>
<td><a href="videos/{{ r.name }}.html">{{ r.title }}</a></td>
<td>{% if r.score is not none %}<span class="bar"><span style="width:{{ (r.score * 100)|round(1) }}%;background:{{ r.colour }}"></span><i style="left:{{ (r.threshold * 100)|round(1) }}%"></i></span> {{ "%.4f"|format(r.score) }}{% else %}none{% endif %}</td>
<td>{% if r.label %}<span class="{{ r.label }}">{{ r.label }}</span>{% endif %}</td>
{% if labelled %}<td>{{ r.true_label }}</td>{% endif %}<td>{{ r.status }}</td></tr>
{% endfor %}</table>
</body></html>
""")


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def jpeg_uri(rgb: np.ndarray, quality: int = 90) -> str:
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    return data_uri(data.tobytes(), "image/jpeg")


def _png_uri(fig: Figure) -> str:
    from io import BytesIO
    buffer = BytesIO()
    fig.savefig(buffer, format="png")
    return data_uri(buffer.getvalue(), "image/png")


def heatmap_overlay(crop: np.ndarray, heat: np.ndarray, weight: float = 0.5) -> np.ndarray:
    """The crop under a jet-coloured heatmap (0..1), as Grad-CAM figures are usually drawn."""
    colour = cv2.applyColorMap(np.round(heat * 255).astype(np.uint8), cv2.COLORMAP_JET)
    colour = cv2.cvtColor(colour, cv2.COLOR_BGR2RGB).astype(np.float32)
    return np.round(crop * (1 - weight) + colour * weight).clip(0, 255).astype(np.uint8)


def _timeline(track: int, clips: list, fps: float, threshold: float, end: int) -> str:
    """Each clip a segment from its first to its last frame at its probability; seconds when the fps is known.
    Every track's axis runs to the video's last scored frame ``end``, so the tracks of a video line up."""
    per = 1 / fps if fps > 0 else 1.0
    fig = Figure(figsize=(6, 1.9), dpi=100)
    ax = fig.add_subplot()
    for _, prob, frames in clips:
        ax.plot([frames[0] * per, frames[-1] * per], [prob, prob], color="tab:red", linewidth=3)
    ax.axhline(threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {threshold:.3f}")
    ax.set_ylim(0, 1)
    ax.set_xlim(0, max(end * per, per))
    ax.set_xlabel("seconds" if fps > 0 else "frame")
    ax.set_ylabel("P(fake)")
    ax.set_title(f"track {track}", fontsize=9)
    ax.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    return _png_uri(fig)


def _strip_image(image: np.ndarray, faces: list) -> np.ndarray:
    scale = STRIP_HEIGHT / image.shape[0]
    small = cv2.resize(image, (max(1, round(image.shape[1] * scale)), STRIP_HEIGHT), interpolation=cv2.INTER_AREA)
    for track, box in faces:
        x1, y1, x2, y2 = (np.asarray(box) * scale).round().astype(int).tolist()
        colour = TRACK_COLOURS[track % len(TRACK_COLOURS)]
        cv2.rectangle(small, (x1, y1), (x2, y2), colour, 2)
        cv2.putText(small, str(track), (x1 + 2, max(y1 - 4, 10)), cv2.FONT_HERSHEY_SIMPLEX, 0.45, colour, 1)
    return small


def _face(face, fps: float, size: int) -> dict:
    """The clip's frame with the strongest heatmap: the ConvLSTM may lean on one frame of a clip far more than on
    the others (on the demo model the first frame's peak is ~10x the rest), and the others would show a blank map."""
    explanation: ClipExplanation = face.explanation
    shown = int(explanation.heatmaps.reshape(len(face.frames), -1).max(axis=1).argmax())
    crop = cv2.resize(face.crops[shown], (size, size), interpolation=cv2.INTER_AREA)
    heat = cv2.resize(explanation.heatmaps[shown], (size, size), interpolation=cv2.INTER_LINEAR)
    return {"track": face.track, "first": face.frames[0], "last": face.frames[-1], "shown": face.frames[shown],
            "probability": face.probability,
            "seconds": face.frames[0] / fps if fps > 0 else None, "crop": jpeg_uri(crop),
            "heatmap": jpeg_uri(heatmap_overlay(crop, heat)), "hq": explanation.attention[0],
            "lq": explanation.attention[1]}


def _colour(score: float, threshold: float) -> str:
    return "#c33" if score >= threshold else "#3a3"


def video_page(row: dict, evidence, name: str, settings: dict) -> tuple[str, dict]:
    """The page of one video, and its entry for the index (small: the index is built from these alone)."""
    threshold = float(row["threshold"])
    true_label = row.get("true_label") or ""
    wrong = bool(true_label and row["label"] and true_label != row["label"])
    tracks: dict[int, list] = {}
    for clip in row["clip_probs"]:
        tracks.setdefault(int(clip[0]), []).append(clip)
    end = max((frames[-1] for _, _, frames in row["clip_probs"]), default=0)
    timelines = [{"track": t, "score": float(row["track_scores"][str(t)]), "clips": len(clips),
                  "image": _timeline(t, clips, evidence.fps, threshold, end)} for t, clips in sorted(tracks.items())]
    faces = [_face(f, evidence.fps, settings["thumb_size"]) for f in evidence.faces]
    strip = [{"frame": frame, "tracks": [t for t, _ in boxes], "image": jpeg_uri(_strip_image(image, boxes), 85)}
             for frame, image, boxes in evidence.strip]
    page = VIDEO_TEMPLATE.render(
        style=_STYLE, title=Path(row["path"]).name, row=row, threshold=threshold, true_label=true_label, wrong=wrong,
        bar_colour=_colour(row["score"], threshold) if row["score"] is not None else "",
        status_text=STATUS_TEXT.get(row["status"], ""), note=evidence.note, timelines=timelines, faces=faces,
        strip=strip)
    entry = {"name": name, "path": row["path"], "status": row["status"], "score": row["score"], "threshold": threshold,
             "label": row["label"], "true_label": true_label, "wrong": wrong,
             "thumb": _thumb(evidence.faces[0].crops) if evidence.faces else ""}
    return page, entry


def _thumb(crops: np.ndarray) -> str:
    return jpeg_uri(cv2.resize(crops[len(crops) // 2], (56, 56), interpolation=cv2.INTER_AREA), 80)


def index_page(entries: list[dict], plots_dir: Path | None, title: str) -> str:
    """Every video as a row: misclassified first, then by score, highest first; videos without a score last. Each
    is shown against the threshold its verdict was made with (score-video's, which `--threshold` may have set).
    ``plots_dir``: score-video's `<stem>_plots/` (ROC, PR, confusion), shown when it exists."""
    view = [{**e, "title": Path(e["path"]).name,
             "colour": _colour(e["score"], e["threshold"]) if e["score"] is not None else ""} for e in entries]
    thresholds = sorted({e["threshold"] for e in entries})
    shown = ", ".join(f"{t:.4f}" for t in thresholds[:3]) + (", ..." if len(thresholds) > 3 else "")
    threshold = shown if len(thresholds) <= 1 else f"per video ({shown})"
    view.sort(key=lambda e: (not e["wrong"], e["score"] is None, -(e["score"] or 0.0), e["path"]))
    plots = []
    if plots_dir is not None and plots_dir.is_dir():
        plots = [{"name": n.removesuffix(".png"), "image": data_uri((plots_dir / n).read_bytes(), "image/png")}
                 for n in ("roc.png", "pr.png", "confusion.png") if (plots_dir / n).is_file()]
    labelled = sum(1 for e in entries if e["true_label"])
    return INDEX_TEMPLATE.render(style=_STYLE, title=title, rows=view, threshold=threshold,
                                 plots=plots, labelled=labelled, wrong=sum(e["wrong"] for e in entries))
