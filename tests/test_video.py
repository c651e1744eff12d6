"""stages/video.py: which frames come out, what they look like, and how bad files and failing decoders behave."""
from __future__ import annotations

import os
from fractions import Fraction

import av
import cv2
import numpy as np
import pytest
from conftest import moov_first, pattern_frames

from dfpipe.pipeline.config import load_config
from dfpipe.stages import video
from dfpipe.stages.video import FrameReader, VideoError, probe, write_video

N = 20
needs_decord = pytest.mark.skipif(video.decord is None, reason="decord is not installed on this platform")


def read(path, **overrides):
    """Read with the extract defaults, overridden as a test needs; returns (frames, reader)."""
    reader = FrameReader(path, **{**load_config().extract, **overrides})
    return list(reader), reader


def luma(image: np.ndarray) -> np.ndarray:
    # Compare on luma: 4:2:0 chroma subsampling blurs the noise colours of pattern_frames, luma survives.
    return image.astype(np.float64) @ [0.299, 0.587, 0.114]


def nearest(image: np.ndarray, references: list[np.ndarray]) -> tuple[int, float]:
    """Index of the reference frame the image looks most like, and its mean absolute luma error."""
    errors = [np.abs(luma(image) - luma(ref)).mean() for ref in references]
    return int(np.argmin(errors)), float(min(errors))


def assert_frames_match(frames, references):
    for frame in frames:
        index, error = nearest(frame.image, references)
        assert (index, frame.image.dtype) == (frame.index, np.uint8)
        assert error < 4.0


def write_with_pts(path, frames, pts_ms, rotation=0):
    """H.264 with explicit presentation times and display rotation, which write_video cannot set."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv444p"
        stream.codec_context.time_base = Fraction(1, 1000)
        stream.set_display_rotation(rotation)
        for image, pts in zip(frames, pts_ms):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = pts, Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_probe_reports_container_facts(clip_factory):
    info = probe(clip_factory(n=12, width=64, height=48, fps=25))
    assert info == {"frames": 12, "fps": 25.0, "width": 64, "height": 48, "codec": "h264", "rotation": 0,
                    "duration": pytest.approx(12 / 25)}


@pytest.mark.parametrize("decoder", ["pyav", pytest.param("decord", marks=needs_decord), "auto"])
@pytest.mark.parametrize("stride,max_frames,indices", [(3, 4, [0, 3, 6, 9]), (4, None, [0, 4, 8, 12, 16]),
                                                        (1, 3, [0, 1, 2]), (7, 0, [])])
def test_stride_and_max_frames_select_indices_and_pixels(clip_factory, decoder, stride, max_frames, indices):
    frames, reader = read(clip_factory(n=N), stride=stride, max_frames=max_frames, decoder=decoder)
    assert [f.index for f in frames] == indices
    assert [f.timestamp for f in frames] == pytest.approx([i / 30 for i in indices], abs=1e-3)
    assert_frames_match(frames, list(pattern_frames(N)))
    assert reader.expected_frames == N
    assert reader.decoders_used == ([] if not indices else ["pyav"] if decoder == "auto" else [decoder])


@needs_decord
def test_pyav_and_decord_give_the_same_frames(clip_factory):
    path = clip_factory(n=N, seed=3)
    by_pyav, _ = read(path, stride=1, decoder="pyav")
    by_decord, _ = read(path, stride=1, decoder="decord")
    assert [f.index for f in by_pyav] == [f.index for f in by_decord] == list(range(N))
    for a, b in zip(by_pyav, by_decord):
        assert a.timestamp == pytest.approx(b.timestamp, abs=1e-4)
        assert np.abs(a.image.astype(int) - b.image).mean() < 1.0


@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_rotation_metadata_gives_upright_frames(tmp_path, rotation):
    stored = list(pattern_frames(6, 64, 48))
    path = write_with_pts(tmp_path / "rotated.mp4", stored, [i * 33 for i in range(6)], rotation=rotation)
    info = probe(path)
    assert (info["rotation"], info["width"], info["height"]) == ((rotation, 48, 64) if rotation != 180 else
                                                                (180, 64, 48))
    frames, reader = read(path, stride=1, decoder="auto")
    assert reader.decoders_used == ["pyav"]
    # np.rot90 turns counter-clockwise, the direction PyAV's rotation (and ffmpeg's autorotate) uses.
    assert_frames_match(frames, [np.rot90(image, rotation // 90) for image in stored])


@needs_decord
def test_decord_upright_for_half_turn_and_refuses_quarter_turns(tmp_path):
    stored = list(pattern_frames(4, 64, 48))
    half = write_with_pts(tmp_path / "r180.mp4", stored, [0, 33, 66, 99], rotation=180)
    frames, _ = read(half, stride=1, decoder="decord")
    assert_frames_match(frames, [np.rot90(image, 2) for image in stored])
    quarter = write_with_pts(tmp_path / "r90.mp4", stored, [0, 33, 66, 99], rotation=90)
    with pytest.raises(VideoError, match="decord: cannot read video rotated 90 degrees"):
        read(quarter, stride=1, decoder="decord")


@pytest.mark.parametrize("decoder", ["pyav", pytest.param("decord", marks=needs_decord)])
@pytest.mark.parametrize("pix_fmt,width,height", [("yuv420p10le", 64, 48), ("yuv444p", 63, 47)])
def test_ten_bit_and_odd_sizes_decode_to_rgb_uint8(tmp_path, decoder, pix_fmt, width, height):
    path = tmp_path / f"{pix_fmt}.mp4"
    write_video(path, pattern_frames(6, width, height), pix_fmt=pix_fmt)
    assert (probe(path)["width"], probe(path)["height"]) == (width, height)
    frames, _ = read(path, stride=1, decoder=decoder)
    assert [f.image.shape for f in frames] == [(height, width, 3)] * 6
    assert_frames_match(frames, list(pattern_frames(6, width, height)))


@pytest.mark.parametrize("decoder", ["pyav", pytest.param("decord", marks=needs_decord)])
def test_variable_frame_rate_timestamps_follow_pts(tmp_path, decoder):
    pts_ms = [0, 33, 66, 200, 233, 500, 533, 566, 1000, 1100]
    stored = list(pattern_frames(len(pts_ms)))
    frames, _ = read(write_with_pts(tmp_path / "vfr.mp4", stored, pts_ms), stride=1, decoder=decoder)
    assert [f.index for f in frames] == list(range(len(pts_ms)))
    assert [f.timestamp for f in frames] == pytest.approx([t / 1000 for t in pts_ms], abs=1e-3)
    assert_frames_match(frames, stored)


def bad_inputs(tmp_path, clip_factory):
    image = next(pattern_frames(1))
    (tmp_path / "empty.mp4").touch()
    cv2.imwrite(str(tmp_path / "photo.png"), image)
    cv2.imwrite(str(tmp_path / "photo.jpg"), image)
    os.replace(tmp_path / "photo.png", tmp_path / "png.mp4")
    os.replace(tmp_path / "photo.jpg", tmp_path / "jpeg.mp4")
    (tmp_path / "noise.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes())
    with av.open(str(tmp_path / "audio.mp4"), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 16000), np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 16000, 0
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    clip = clip_factory("whole.mp4", n=12)
    (tmp_path / "cut.mp4").write_bytes(clip.read_bytes()[: clip.stat().st_size // 2])  # index (moov) is at the end
    return {"missing.mp4": "file not found", "empty.mp4": "empty file (0 bytes)",
            "audio.mp4": "no video stream (audio only)", "png.mp4": "not a video (single image)",
            "jpeg.mp4": "not a video (single image)",
            "noise.mp4": "cannot open (Invalid data found when processing input)",
            "cut.mp4": "cannot open (Invalid data found when processing input)"}


def test_bad_inputs_raise_video_error_with_reason(tmp_path, clip_factory):
    for name, reason in bad_inputs(tmp_path, clip_factory).items():
        for call in (probe, lambda p: FrameReader(p, stride=1, max_frames=None, decoder="auto")):
            with pytest.raises(VideoError) as caught:
                call(tmp_path / name)
            assert (str(caught.value), caught.value.reason) == (f"{tmp_path / name}: {reason}", reason)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file_raises_permission_denied(clip_factory):
    path = clip_factory()
    path.chmod(0)
    with pytest.raises(VideoError, match="permission denied$"):
        probe(path)


def full_decode(monkeypatch, path, **overrides):
    """The frames as a decode of every frame gives them: the reference the skipping decode must equal."""
    with monkeypatch.context() as m:
        m.setattr(video, "_sampled_frames", video._all_frames)
        return read(path, **overrides)[0]


def assert_same_frames(frames, reference):
    assert [(f.index, f.timestamp) for f in frames] == [(f.index, f.timestamp) for f in reference]
    for frame, ref in zip(frames, reference):
        assert np.array_equal(frame.image, ref.image), frame.index


@pytest.mark.parametrize("stride,max_frames", [(3, None), (2, None), (4, 5)])
def test_a_stride_skips_unreferenced_frames_and_gives_the_full_decodes_pixels(clip_factory, monkeypatch, stride,
                                                                               max_frames):
    path = clip_factory(n=60)  # x264's default B-frames: some referenced, some not
    decoded = []

    def counted(*args):
        for number, frame in video._sampled_frames.__wrapped__(*args):
            decoded.append(number)
            yield number, frame
    counted.__wrapped__ = video._sampled_frames
    monkeypatch.setattr(video, "_sampled_frames", counted)
    frames, reader = read(path, stride=stride, max_frames=max_frames, decoder="pyav")
    assert_same_frames(frames, full_decode(monkeypatch, path, stride=stride, max_frames=max_frames, decoder="pyav"))
    assert [f.index for f in frames] == list(range(0, 60, stride))[:max_frames] and reader.errors == []
    assert set(range(0, decoded[-1] + 1, stride)) <= set(decoded) and len(decoded) < decoded[-1] + 1  # some skipped


def test_packets_without_timestamps_are_decoded_whole(tmp_path, monkeypatch):
    path = tmp_path / "raw.h264"  # an elementary stream: no container, no packet timestamps
    write_video(path, pattern_frames(N))
    frames, reader = read(path, stride=3, decoder="pyav")
    assert [f.index for f in frames] == list(range(0, N, 3)) and reader.errors == []
    assert_same_frames(frames, full_decode(monkeypatch, path, stride=3, decoder="pyav"))
    assert_frames_match(frames, list(pattern_frames(N)))


def test_real_clips_skip_decoding_to_the_same_sampled_frames(shared_data, monkeypatch):
    for path in [shared_data / "dfdc_sample" / "abofeumbvv.mp4",  # 1080p DFDC, B-frames
                 shared_data / "ffpp_c40" / "original_sequences" / "youtube" / "c40" / "videos" / "183.mp4"]:
        frames, _ = read(path, stride=3, decoder="pyav")
        assert len(frames) > 90
        assert_same_frames(frames, full_decode(monkeypatch, path, stride=3, decoder="pyav"))


def failing_after(count, raise_error):
    """A PyAV backend that stops after `count` frames, by raising or by ending quietly."""
    real = video.BACKENDS["pyav"]

    def backend(path, pending, info):
        for n, item in enumerate(real(path, pending, info)):
            if n == count:
                if raise_error:
                    raise VideoError(path, "pyav: injected failure")
                return
            yield item
    return backend


@needs_decord
@pytest.mark.parametrize("raise_error", [True, False])
@pytest.mark.parametrize("stride,count", [(1, 7), (3, 2), (2, 0)])
def test_fallback_continues_with_decord_without_gaps_or_duplicates(clip_factory, monkeypatch, raise_error,
                                                                   stride, count):
    monkeypatch.setitem(video.BACKENDS, "pyav", failing_after(count, raise_error))
    frames, reader = read(clip_factory(n=N), stride=stride, max_frames=None, decoder="auto")
    assert [f.index for f in frames] == list(range(0, N, stride))
    assert_frames_match(frames, list(pattern_frames(N)))
    assert reader.decoders_used == (["pyav", "decord"] if count else ["decord"])
    expected_reason = "pyav: injected failure" if raise_error else f"pyav: ended before frame {count * stride} of {N}"
    assert reader.errors == [expected_reason]


def test_both_decoders_failing_raises_the_primary_reason(clip_factory, monkeypatch):
    monkeypatch.setitem(video.BACKENDS, "pyav", failing_after(0, raise_error=True))
    monkeypatch.setitem(video.BACKENDS, "decord", failing_after(0, raise_error=True))
    path = clip_factory()
    with pytest.raises(VideoError) as caught:
        read(path, stride=1, decoder="auto")
    assert str(caught.value) == f"{path}: pyav: injected failure"


def test_pyav_alone_keeps_the_frames_before_a_failure(clip_factory, monkeypatch):
    monkeypatch.setitem(video.BACKENDS, "pyav", failing_after(3, raise_error=True))
    frames, reader = read(clip_factory(n=N), stride=2, decoder="pyav")
    assert ([f.index for f in frames], reader.decoders_used, reader.errors) == (
        [0, 2, 4], ["pyav"], ["pyav: injected failure"])


def test_truncated_video_yields_the_frames_it_has(tmp_path, clip_factory):
    whole = moov_first(clip_factory(n=30), tmp_path / "streamable.mp4")
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size * 6 // 10])
    frames, reader = read(cut, stride=2, max_frames=None, decoder="auto")
    indices = [f.index for f in frames]
    assert 0 < len(indices) < 15 and indices == list(range(0, 2 * len(indices), 2))
    assert_frames_match(frames, list(pattern_frames(30)))
    assert (reader.expected_frames, reader.decoders_used) == (30, ["pyav"])
    assert reader.errors[0] == f"pyav: ended before frame {2 * len(indices)} of 30"
    with pytest.raises(VideoError, match=rf"cut.mp4: truncated or corrupt, decoded frames up to {indices[-1]} of 30"):
        reader.check_complete()
    reader.info["duration"] = (indices[-1] + 1) / reader.info["fps"]  # an edit list that trims the samples after
    reader.check_complete()
    _, capped = read(cut, stride=2, max_frames=3, decoder="auto")  # asked for no more than it has
    capped.check_complete()
    _, complete = read(whole, stride=7, max_frames=None, decoder="auto")  # last sampled frame 28 of 30
    complete.check_complete()


@pytest.mark.parametrize("suffix", [".mkv", ".webm"])
def test_a_cut_matroska_or_webm_is_truncated_by_its_duration(tmp_path, suffix):
    """Their headers carry no frame count, only a duration: a cut file used to pass as complete, or as empty."""
    whole = tmp_path / f"whole{suffix}"
    codec = "libvpx-vp9" if suffix == ".webm" else "libx264"
    write_video(whole, pattern_frames(40), codec=codec, **({"crf": 30} if codec == "libx264" else {}))
    frames, reader = read(whole, stride=3, decoder="pyav")
    assert reader.info["frames"] == 0 and reader.promised_frames() == 40 and len(frames) == 14
    reader.check_complete()
    cut = tmp_path / f"cut{suffix}"
    for share in (2, 5):  # a tenth of the bytes: not one frame; half: some
        cut.write_bytes(whole.read_bytes()[: whole.stat().st_size * share // 10])
        with pytest.raises(VideoError, match=r"truncated or corrupt, (no frame decoded|decoded frames up to \d+) "
                                             r"of 40"):
            frames, reader = read(cut, stride=3, decoder="pyav")
            reader.check_complete()


def test_the_main_video_stream_is_read_not_a_thumbnail_before_it(tmp_path):
    """A 2-frame 16x16 stream first, the video second: both decoders read the video (as FFmpeg chooses it)."""
    path = tmp_path / "two.mkv"
    with av.open(str(path), "w") as out:
        thumb, main = out.add_stream("libx264", rate=30), out.add_stream("libx264", rate=30)
        thumb.width = thumb.height = 16
        main.width, main.height = 64, 48
        for i, image in enumerate(pattern_frames(12)):
            packets = main.encode(av.VideoFrame.from_ndarray(image, format="rgb24"))
            if i < 2:
                packets += thumb.encode(av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24"))
            out.mux(packets)
        out.mux(main.encode() + thumb.encode())
    info = probe(path)
    assert (info["width"], info["height"]) == (64, 48)
    for decoder in ("pyav", "decord") if video.decord is not None else ("pyav",):
        frames, reader = read(path, stride=1, decoder=decoder)
        assert len(frames) == 12, decoder
        assert_frames_match(frames, list(pattern_frames(12)))
        reader.check_complete()


def test_decoder_choice(monkeypatch):
    assert video.decoder_chain("pyav") == ("pyav",)
    with pytest.raises(ValueError, match="decoder must be one of auto, pyav, decord, got 'ffmpeg'"):
        video.decoder_chain("ffmpeg")
    monkeypatch.setattr(video, "decord", None)
    assert video.decoder_chain("auto") == ("pyav",)
    with pytest.raises(ValueError, match="decord is not installed"):
        video.decoder_chain("decord")


def test_real_clip_decodes_every_frame_alike(shared_data):
    path = shared_data / "reals" / "d1.mp4"  # 16 frames, 512x512, with an audio track
    info = probe(path)
    frames, reader = read(path, stride=1, decoder="auto")
    assert [f.index for f in frames] == list(range(info["frames"]))
    assert frames[0].image.shape == (info["height"], info["width"], 3)
    assert reader.decoders_used == ["pyav"] and reader.errors == []
    if video.decord is not None:
        by_decord, _ = read(path, stride=5, decoder="decord")
        for frame in by_decord:
            assert np.abs(frame.image.astype(int) - frames[frame.index].image).mean() < 1.0
