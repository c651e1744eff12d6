"""Reading and writing video frames, and the JPEG every stored image (frame, crop) is written as.

Every stage that reads a video goes through `probe` and `FrameReader`, so that bad files fail
with one clear reason and frame indices mean the same thing whichever decoder produced them.
Reading uses PyAV first because it is the faster of the two on DFDC-like H.264
(benchmarks/bench_decode.py) and honours rotation; decord, built on its own FFmpeg, is the
second chance when PyAV fails or stops short of the container's frame count.
"""
from __future__ import annotations

import heapq
import importlib.util
import os
import re
import sys
from collections import deque
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Callable, Iterable, Iterator

import av
import cv2
import numpy as np

from ..manifests.errors import DfpipeError, InputError

_UNLOADED = object()


def _decord():
    """decord, imported when a read first falls back to it (its import is ~0.35 s of every command's start-up,
    which PyAV reads never need), or None: it ships wheels for Linux x86-64 only; elsewhere auto means PyAV alone.
    `video.decord` reads it too; a test may set it to None."""
    module = globals().get("decord", _UNLOADED)
    if module is _UNLOADED:
        try:
            import decord as module
            # decord's own FFmpeg logs to stderr ("partial file" on a truncated file); its errors reach us as
            # exceptions, which become the video's one-line reason, so the log only adds lines the user cannot place
            module.logging.set_level(module.logging.QUIET)
        except ImportError:
            module = None
        globals()["decord"] = module
    return module


def _has_decord() -> bool:
    module = globals().get("decord", _UNLOADED)
    return importlib.util.find_spec("decord") is not None if module is _UNLOADED else module is not None


def __getattr__(name: str):
    if name == "decord":
        return _decord()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

DECODERS = ("auto", "pyav", "decord")
# Frames per decord get_batch call: large enough to amortise the call, small enough that a
# 1080p chunk stays around 50 MB however long the video is.
DECORD_CHUNK = 8


def write_video(path: str | Path, frames: Iterable[np.ndarray], fps: float = 30, crf: int = 18,
                pix_fmt: str = "yuv420p", codec: str = "libx264", preset: str = "medium", threads: int = 1) -> None:
    """Encode RGB uint8 frames (H, W, 3) as H.264; used by the demo-data generator, tests and benchmarks.

    x264's output depends on its thread count, so one thread (the default) makes the same frames give the same
    bytes on every machine; benchmarks that only need speed pass threads=0 (one per core)."""
    with av.open(str(path), "w") as container:
        stream = None
        for frame in frames:
            if stream is None:
                stream = container.add_stream(codec, rate=int(round(fps)) if float(fps).is_integer() else fps)
                stream.width, stream.height = frame.shape[1], frame.shape[0]
                stream.pix_fmt = pix_fmt
                stream.options = {"crf": str(crf), "preset": preset, "threads": str(threads)}
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        if stream is not None:
            for packet in stream.encode():
                container.mux(packet)


def jpeg_bytes(image: np.ndarray, quality: int) -> bytes:
    """An RGB image (a frame, a crop) as dfpipe stores it: OpenCV's JPEG at `quality`. One encoder for extract,
    align and score-video, which reproduces the stored pixels. cvtColor, not a [:, :, ::-1] view: libjpeg on a
    negative-stride view is 2.4x slower per 1080p frame."""
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return data.tobytes()


class VideoError(DfpipeError):
    """A video that cannot be read; callers log `str(err)` as one line and skip the file."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


@dataclass(frozen=True)
class Frame:
    index: int  # position in decode (presentation) order; identical for both decoders
    timestamp: float  # seconds since the stream's first frame
    image: np.ndarray  # H x W x 3 uint8 RGB, upright


def probe(path: str | Path) -> dict:
    """Container facts for planning a read, with the reason when the file is not a readable video.

    Rotation costs one decoded frame: PyAV 18 exposes the display matrix on decoded frames
    (`VideoFrame.rotation`) but not on streams. A first frame that will not decode reports
    rotation 0 and leaves the failure to `FrameReader`, which may still read the file with decord.
    """
    path = Path(path)
    _check_file(path)
    try:
        container = av.open(str(path))
    except av.FFmpegError as err:
        raise VideoError(path, f"cannot open ({err.strerror})") from err
    with container:
        if container.format.name == "image2" or container.format.name.endswith("_pipe"):
            raise VideoError(path, "not a video (single image)")
        if not container.streams.video:
            kinds = " and ".join(sorted({s.type for s in container.streams}))
            raise VideoError(path, f"no video stream ({kinds} only)" if kinds else "no video stream")
        stream = main_stream(container)
        if stream.codec_context is None:  # a track whose sample description is missing: the header was cut
            raise VideoError(path, "video stream without a codec (damaged or truncated header)")
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        duration = _stream_duration(container, stream, fps)
        rotation = _first_frame_rotation(container, stream)
        width, height = stream.codec_context.width, stream.codec_context.height
        if rotation in (90, 270):
            width, height = height, width
        return {"frames": stream.frames, "fps": fps, "width": width, "height": height,
                "codec": stream.codec_context.name, "rotation": rotation, "duration": duration}


def _stream_duration(container: av.container.InputContainer, stream: av.video.stream.VideoStream,
                     fps: float) -> float:
    """Seconds of video: the stream's own duration, else its Matroska DURATION tag, else the container's when
    the video is its only stream (with audio, the container's may be the longer audio's), else frames / fps."""
    if stream.duration:
        return float(stream.duration * stream.time_base)
    tag = re.fullmatch(r"(\d+):(\d\d):(\d\d(?:\.\d+)?)", stream.metadata.get("DURATION", ""))
    if tag:
        return int(tag[1]) * 3600 + int(tag[2]) * 60 + float(tag[3])
    if container.duration and len(container.streams) == 1:
        return container.duration / av.time_base
    return stream.frames / fps if fps else 0.0


def main_stream(container: av.container.InputContainer) -> av.video.stream.VideoStream:
    """FFmpeg's choice of the video stream (av_find_best_stream: not cover art, the most frames probed), the one
    decord reads too, so a fallback mid-video continues the same stream; the first stream may be a thumbnail."""
    return container.streams.best("video") or container.streams.video[0]


# a container's frame count is sometimes an estimate; fewer than this share of it means the file is cut short
TRUNCATED_BELOW = 0.95


class FrameReader:
    """Streams the sampled frames of one video, switching decoder mid-video when the first fails.

    Frames are produced one at a time (decord: one DECORD_CHUNK at a time), so memory does not grow
    with the length of the video. After a pass, `decoders_used` names the decoders that produced
    frames and `errors` says why a decoder stopped early; `check_complete` tells a truncated video.
    """

    def __init__(self, path: str | Path, *, stride: int, max_frames: int | None, decoder: str, **_):
        if stride < 1:
            raise InputError(f"stride must be >= 1, got {stride}")
        if max_frames is not None and max_frames < 0:
            raise InputError(f"max_frames must be >= 0 or None, got {max_frames}")
        self.path = Path(path)
        self.stride = stride
        self.max_frames = max_frames
        self.decoders = decoder_chain(decoder)
        self.info = probe(self.path)
        self.expected_frames: int = self.info["frames"]
        self.decoders_used: list[str] = []
        self.errors: list[str] = []
        self.last_index, self.count = -1, 0

    def promised_frames(self) -> int:
        """How many frames the container says it holds: the smaller of its sample count (which includes frames an
        edit list trims, cut without re-encoding) and duration x fps (all a Matroska or WebM header gives); 0 when
        it says neither."""
        counts = [int(self.expected_frames or 0), round(self.info["duration"] * self.info["fps"])]
        return min([c for c in counts if c > 0], default=0)

    def check_complete(self) -> None:
        """After a pass: a VideoError when it ended well before the frames the container promised (and before
        max_frames), so extract and score-video both refuse a cut or damaged file instead of using a part of it."""
        expected = self.promised_frames()
        capped = self.max_frames is not None and self.count >= self.max_frames
        if expected and not capped and self.last_index + self.stride < TRUNCATED_BELOW * expected:
            raise VideoError(self.path, f"truncated or corrupt, decoded frames up to {self.last_index} of {expected}")

    def __iter__(self) -> Iterator[Frame]:
        self.decoders_used, self.errors = [], []
        self.last_index, self.count = -1, 0
        pending = range(0, sys.maxsize, self.stride)[: self.max_frames]
        for name in self.decoders:
            if not pending:
                break
            try:
                for index, timestamp, image in BACKENDS[name](self.path, pending, self.info):
                    if name not in self.decoders_used:
                        self.decoders_used.append(name)
                    self.last_index, self.count = index, self.count + 1
                    yield Frame(index, timestamp, image)
                    pending = pending[pending.index(index) + 1:]
            except VideoError as err:
                self.errors.append(err.reason)
                continue
            if not pending or pending[0] >= self.expected_frames:
                break
            self.errors.append(f"{name}: ended before frame {pending[0]} of {self.expected_frames}")
        if not self.decoders_used and pending:
            promised = self.promised_frames()
            reason = f"truncated or corrupt, no frame decoded of {promised}" if promised else "no frames decoded"
            raise VideoError(self.path, self.errors[0] if self.errors else reason)


def decoder_chain(decoder: str) -> tuple[str, ...]:
    """The decoders to try in order for a `decoder` setting from the config."""
    if decoder not in DECODERS:
        raise InputError(f"decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
    if decoder == "decord" and not _has_decord():
        raise InputError("decoder 'decord' requested but decord is not installed on this platform")
    if decoder == "auto":
        return ("pyav", "decord") if _has_decord() else ("pyav",)
    return (decoder,)


def _check_file(path: Path) -> None:
    if not path.exists():
        raise VideoError(path, "file not found")
    if not os.access(path, os.R_OK):
        raise VideoError(path, "permission denied")
    if path.stat().st_size == 0:
        raise VideoError(path, "empty file (0 bytes)")


def _first_frame_rotation(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> int:
    try:
        frame = next(container.decode(stream), None)
    except av.FFmpegError:
        return 0
    return frame.rotation % 360 if frame is not None else 0


def _pyav_frames(path: Path, pending: range, info: dict) -> Iterator[tuple[int, float, np.ndarray]]:
    """The pending frames, converted to RGB. With a stride, frames that are neither pending nor referenced by others
    are not decoded at all (`_sampled_frames`); a stream whose packets cannot say which frame they are is decoded
    whole from the first frame not yet given."""
    given = -1
    try:
        if pending.step > 1:
            try:
                for item in _decode(path, pending, info, _sampled_frames):
                    given = item[0]
                    yield item
                return
            except _Unnumbered:
                pending = pending[pending.index(given) + 1:] if given >= 0 else pending
        yield from _decode(path, pending, info, _all_frames)
    except av.FFmpegError as err:
        raise VideoError(path, f"pyav: {err.strerror}") from err


def _decode(path: Path, pending: range, info: dict, frames: Callable) -> Iterator[tuple[int, float, np.ndarray]]:
    with av.open(str(path)) as container:
        stream = main_stream(container)
        stream.thread_type = "AUTO"
        start = stream.start_time or 0
        for index, frame in frames(container, stream, pending):
            if index in pending:
                image = np.rot90(frame.to_ndarray(format="rgb24"), frame.rotation % 360 // 90)
                yield index, _seconds(frame.pts, start, stream, index, info["fps"]), np.ascontiguousarray(image)
            if index >= pending[-1]:
                return


def _all_frames(container: av.container.InputContainer, stream: av.video.stream.VideoStream,
                pending: range) -> Iterator[tuple[int, av.VideoFrame]]:
    return enumerate(container.decode(stream))


# Packets read ahead of the decoder to learn which frame each one is: more than any codec holds back for reordering
# (H.264 and HEVC at most 16 frames).
REORDER_WINDOW = 32


class _Unnumbered(Exception):
    """A packet without a timestamp, a timestamp twice, or a frame that matches no packet: the frame numbers cannot
    be told from the packets."""


def _sampled_frames(container: av.container.InputContainer, stream: av.video.stream.VideoStream,
                    pending: range) -> Iterator[tuple[int, av.VideoFrame]]:
    """Numbered frames, skipping (FFmpeg's skip_frame, set per packet) the decode of each frame that is not pending
    and that no other frame references: a non-reference frame changes no other frame's pixels, so the pending
    frames are exactly those of a full decode (tests/test_video.py), for ~2/3 of the decode time at stride 3."""
    context = stream.codec_context
    numbers: dict[int, int] = {}  # a skipped frame's entry stays: a few bytes per frame of the video
    for packet, number in _numbered_packets(container.demux(stream)):
        if number is not None:
            numbers[packet.pts] = number
        context.skip_frame = "NONREF" if number is not None and number not in pending else "DEFAULT"
        for frame in context.decode(packet):
            if frame.pts not in numbers:
                raise _Unnumbered
            yield numbers.pop(frame.pts), frame


def _numbered_packets(packets: Iterable[av.Packet]) -> Iterator[tuple[av.Packet, int | None]]:
    """Packets in decode order, each with the number its frame has in presentation order (what a full decode
    counts): the rank of its timestamp, known once REORDER_WINDOW later packets are read. None for the final empty
    packet and for packets the container marks to discard (an edit list's lead-in), whose frames the decoder
    drops."""
    waiting: deque[av.Packet] = deque()
    ahead: list[int] = []  # a heap of the timestamps read but not yet numbered
    numbered: dict[int, int] = {}
    count = 0
    for packet in chain(packets, [None]):
        if packet is not None:
            waiting.append(packet)
            if _shown(packet):
                if packet.pts is None or packet.pts in ahead:
                    raise _Unnumbered
                heapq.heappush(ahead, packet.pts)
        while ahead and (len(ahead) > REORDER_WINDOW or packet is None):
            numbered[heapq.heappop(ahead)] = count
            count += 1
        while waiting and (not _shown(waiting[0]) or waiting[0].pts in numbered):
            first = waiting.popleft()
            yield first, numbered.pop(first.pts) if _shown(first) else None


def _shown(packet: av.Packet) -> bool:
    return bool(packet.size) and not packet.is_discard


def _seconds(pts: int | None, start: int, stream: av.video.stream.VideoStream, index: int, fps: float) -> float:
    """Relative to the stream start, as decord reports it, so timestamps agree across a fallback."""
    if pts is not None:
        return float((pts - start) * stream.time_base)
    return index / fps if fps else 0.0


def _decord_frames(path: Path, pending: range, info: dict) -> Iterator[tuple[int, float, np.ndarray]]:
    """Read pending frames in small get_batch chunks, starting wherever PyAV stopped.

    decord 0.6 rotates frames itself; for 180 degrees the result is upright, but for quarter
    turns get_batch fails with a buffer-size mismatch, so those videos are refused up front.
    """
    if info["rotation"] in (90, 270):
        raise VideoError(path, f"decord: cannot read video rotated {info['rotation']} degrees")
    decord = _decord()
    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
        indices = range(pending.start, min(pending.stop, len(reader)), pending.step)
        for first in range(0, len(indices), DECORD_CHUNK):
            chunk = list(indices[first:first + DECORD_CHUNK])
            images = reader.get_batch(chunk).asnumpy()
            timestamps = reader.get_frame_timestamp(chunk)[:, 0].tolist()
            yield from zip(chunk, timestamps, images)
    except (decord.DECORDError, RuntimeError) as err:
        raise VideoError(path, f"decord: {_decord_reason(err)}") from err


def _decord_reason(err: Exception) -> str:
    """decord errors carry a '[hh:mm:ss] /build/path.cc:123: ' prefix and a C++ stack trace."""
    first_line = str(err).strip().splitlines()[0]
    return re.sub(r"\[[\d:]+\] \S+:\d+: ", "", first_line)


BACKENDS: dict[str, Callable[[Path, range, dict], Iterator[tuple[int, float, np.ndarray]]]] = {
    "pyav": _pyav_frames,
    "decord": _decord_frames,
}
