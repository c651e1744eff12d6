"""SequenceDataset on a tiny workspace whose crops encode (frame index, track, real/fake) in their flat colour."""
from __future__ import annotations

import logging
import shutil
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader
from torchvision.io import write_jpeg
from torchvision.transforms.v2 import functional as F

from dfpipe.pipeline.config import load_config
from dfpipe.stages.augment import ClipAugment
from dfpipe.stages.dataset import (BLENDED, BLENDED_SUFFIX, FAKE, REAL, BalancedSampler, SequenceDataset,
                                   collate_clips)
from dfpipe.stages import dataset as dataset_mod
from dfpipe.stages import synthesize
from dfpipe.stages.faces import template_points

T = 4
SAMPLED = list(range(0, 46, 3))          # 16 sampled frames per video; frame 48 is sampled but has no face
LABELS = {"r": 0, "f": 1}
SOURCES = {"f": "r"}
TRACKS = {                                # (video, track) -> frames with a face
    ("r", 0): SAMPLED,
    ("r", 1): [0, 3, 6, 12, 15, 18, 21],  # gap at frame 9: segments of 3 (short) and 4
    ("f", 0): SAMPLED,
    ("f", 1): [30, 33],                   # short, and its source has no track 1 there: no pair
}


def colour(video: str, track: int, frame: int) -> tuple[int, int, int]:
    return 20 + 5 * frame, 60 + 80 * track, 200 if LABELS[video] else 60


def decode(clip: torch.Tensor) -> list[tuple[str, int, int]]:
    """(video, track, frame) of every frame of a float (T, 3, H, W) clip, read back from its mean colour."""
    means = (clip.mean(dim=(2, 3)) * 255).tolist()
    return [("f" if b > 130 else "r", round((g - 60) / 80), round((r - 20) / 5)) for r, g, b in means]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("workspace")
    rows = []
    for video in LABELS:
        with_face = set()
        for (v, track), frames in TRACKS.items():
            if v != video:
                continue
            for frame in frames:
                paths = {}
                for stream, size in (("hq", 224), ("lq", 112)):
                    rel = f"crops/{video}/{track}/{frame:06d}_{stream}.jpg"
                    (root / rel).parent.mkdir(parents=True, exist_ok=True)
                    image = torch.tensor(colour(video, track, frame), dtype=torch.uint8)[:, None, None]
                    write_jpeg(image.expand(3, size, size).contiguous(), str(root / rel), quality=95)
                    paths[f"{stream}_path"] = rel
                rows.append(dict(video_id=video, frame_index=frame, status="face", track_id=track, prob=0.99, **paths))
                with_face.add(frame)
        for frame in sorted(set(SAMPLED + [48]) - with_face):
            rows.append(dict(video_id=video, frame_index=frame, status="no_face", track_id=-1, prob=np.nan,
                             hq_path=np.nan, lq_path=np.nan))
    return root, pd.DataFrame(rows).sample(frac=1, random_state=0)


@pytest.fixture
def workspace(pristine, tmp_path):
    """A private copy, so tests may break crops."""
    root, faces = pristine
    shutil.copytree(root, tmp_path, dirs_exist_ok=True)
    return tmp_path, faces.copy()


PROBABILITIES = ("flip", "affine", "color_jitter", "jpeg", "blur", "noise", "cutout", "randaugment", "mixup", "cutmix")


def augment_only(*names: str, **settings) -> dict[str, float]:
    """The augment section with only ``names`` on (probability 1); ``settings`` set other keys (alphas, ...)."""
    return {k: float(k in names) if k in PROBABILITIES else v for k, v in load_config().dataset.augment.items()} \
        | settings


def make(workspace, train, **overrides) -> SequenceDataset:
    """Augmentation off unless asked for: colour changes would garble the colour-coded frame indices."""
    root, faces = workspace
    kw = {**load_config().dataset, "clip_len": T, "seed": 0, "augment": augment_only(), "synthesize": "none",
          **overrides}
    return SequenceDataset(root, faces, LABELS, train=train, sources=SOURCES, **kw)


def test_clips_are_consecutive_frames_of_one_track_segment(workspace):
    ds = make(workspace, train=True)
    assert len(ds) == 3 and ds.stats["short_skipped"] == 2
    seen = set()
    for epoch in range(4):
        ds.set_epoch(epoch)
        for item in ds:
            assert item["hq"].shape == (T, 3, 224, 224) and item["lq"].shape == (T, 3, 112, 112)
            assert item["hq"].dtype == torch.float32 and 0 <= item["hq"].min() and item["hq"].max() <= 1
            frames = [item["start"] + 3 * k for k in range(T)]
            expected = [(item["video_id"], item["track_id"], f) for f in frames]
            assert decode(item["hq"]) == expected and decode(item["lq"]) == expected
            assert item["label"] == LABELS[item["video_id"]]
            seen.add((item["video_id"], item["track_id"], item["start"]))
    assert ("r", 1, 12) in seen                                   # the only clip of the post-gap segment
    assert not any(v == "r" and t == 1 and s != 12 for v, t, s in seen)


def test_validation_clips_are_fixed_and_evenly_spaced(workspace):
    ds = make(workspace, train=False, val_clips_per_track=4)
    starts = [(item["video_id"], item["track_id"], item["start"]) for item in ds]
    assert starts == [("f", 0, 0), ("f", 0, 12), ("f", 0, 24), ("f", 0, 36), ("r", 0, 0), ("r", 0, 12),
                      ("r", 0, 24), ("r", 0, 36), ("r", 1, 12)]
    first = [item["hq"] for item in ds]
    ds.set_epoch(7)
    assert all(torch.equal(a, item["hq"]) for a, item in zip(first, ds))


def train_starts(ds, epochs) -> list[list[int]]:
    out = []
    for epoch in range(epochs):
        ds.set_epoch(epoch)
        out.append([ds[i]["start"] for i in range(len(ds))])
    return out


def test_train_starts_vary_across_epochs_and_repeat_with_the_seed(workspace):
    starts = train_starts(make(workspace, train=True), 5)
    assert len({s[0] for s in starts}) > 2                                  # 16-frame segment: 13 possible starts
    assert train_starts(make(workspace, train=True), 5) == starts
    assert train_starts(make(workspace, train=True, seed=1), 5) != starts


def test_short_tracks_skip_or_pad(workspace):
    skip = make(workspace, train=False, short_tracks="skip", val_clips_per_track=1)
    pad = make(workspace, train=False, short_tracks="pad", val_clips_per_track=1)
    assert (skip.stats["short_skipped"], skip.stats["short_padded"], len(skip)) == (2, 0, 3)
    assert (pad.stats["short_skipped"], pad.stats["short_padded"], len(pad)) == (0, 2, 5)
    clips = {(item["video_id"], item["track_id"], item["start"]): decode(item["hq"]) for item in pad}
    assert [f for _, _, f in clips[("f", 1, 30)]] == [30, 30, 33, 33]
    assert [f for _, _, f in clips[("r", 1, 0)]] == [0, 3, 6, 6]


def smooth_clip(size: int) -> torch.Tensor:
    """Four identical frames of an asymmetric smooth pattern (downscales cleanly, shows flips and shifts)."""
    y, x = torch.meshgrid(torch.linspace(0, 1, 224), torch.linspace(0, 1, 224), indexing="ij")
    image = torch.stack([x, y * 0.8 + 0.1, (x * y) ** 0.5]) * 255
    image = F.resize(image.round().to(torch.uint8), [size, size], antialias=True)
    return image.expand(4, -1, -1, -1).contiguous()


def test_augmentation_is_shared_by_frames_and_streams():
    probabilities = augment_only(*PROBABILITIES[:7]) | {"noise": 0.0}
    augment = ClipAugment.sample(probabilities, torch.Generator().manual_seed(3))
    assert augment.flip and augment.affine and augment.jitter and augment.jpeg and augment.blur and augment.cutout
    hq_in, lq_in = smooth_clip(224), smooth_clip(112)
    hq, lq = augment(hq_in, torch.Generator()), augment(lq_in, torch.Generator())
    assert all(torch.equal(hq[0], frame) for frame in hq) and all(torch.equal(lq[0], frame) for frame in lq)
    plain = F.to_dtype(hq_in, torch.float32, scale=True)
    assert (hq - plain).abs().mean() > 0.05
    assert (F.resize(hq, [112, 112], antialias=True) - lq).abs().mean() < 0.02
    assert (F.resize(hq, [112, 112], antialias=True) - F.horizontal_flip(lq)).abs().mean() > 0.05


def test_dataset_augments_both_streams_and_the_pair_alike(workspace):
    ds = make(workspace, train=True, paired=True, augment=augment_only("affine", "cutout", "flip"))
    item = next(item for item in ds if "hq_real" in item)
    blank = item["hq"].amax(dim=1) == 0                        # cutout and the affine border, per frame
    assert blank.float().mean() > 0.05
    assert (blank != (item["hq_real"].amax(dim=1) == 0)).float().mean() < 1e-4  # a few border pixels round apart
    assert torch.equal(blank, blank[:1].expand_as(blank))
    assert (F.resize(item["hq"], [112, 112], antialias=True) - item["lq"]).abs().mean() < 0.02


def test_noise_strength_is_shared_and_nothing_is_drawn_when_off():
    assert ClipAugment.sample({k: 0.0 for k in load_config().dataset.augment}, torch.Generator()) == ClipAugment()
    augment = ClipAugment(noise=0.03)
    gen = torch.Generator().manual_seed(0)
    grey = torch.full((4, 3, 112, 112), 128, dtype=torch.uint8)
    noise = augment(grey, gen) - 128 / 255
    assert torch.allclose(noise.std(dim=(1, 2, 3)), torch.full((4,), 0.03), atol=0.002)
    assert not torch.equal(noise[0], noise[1])


def test_unreadable_crop_skips_the_clip_with_a_warning(workspace, caplog):
    root, _ = workspace
    missing = root / "crops/r/1/000015_hq.jpg"
    missing.unlink()
    corrupt = root / "crops/f/0/000045_lq.jpg"
    corrupt.write_bytes(corrupt.read_bytes()[:200])
    ds = make(workspace, train=False, val_clips_per_track=4)
    with caplog.at_level(logging.WARNING, logger="dfpipe.stages.dataset"):
        items = [ds[i] for i in range(len(ds))]
    assert [i for i, item in enumerate(items) if item is None] == [3, 8]   # f/0 from 36 and r/1 from 12
    assert str(missing) in caplog.text and str(corrupt) in caplog.text
    assert ds.stats["failed_clips"] == 2
    batch = collate_clips(items)
    assert batch["hq"].shape == (7, T, 3, 224, 224) and batch["lq"].shape == (7, T, 3, 112, 112)
    assert batch["hq"].amax(dim=(2, 3, 4)).min() > 0.1 and batch["lq"].amax(dim=(2, 3, 4)).min() > 0.1
    assert ("r", 1) not in set(zip(batch["video_id"], batch["track_id"].tolist()))
    assert collate_clips([None, None]) is None


def test_dataloader_workers_reproduce_items_and_share_the_failure_count(workspace):
    root, _ = workspace
    (root / "crops/r/1/000015_lq.jpg").unlink()
    ds = make(workspace, train=True)
    ds.set_epoch(2)
    direct = [None if item is None else (item["video_id"], item["start"]) for item in (ds[i] for i in range(len(ds)))]
    loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_clips)
    batches = [b for b in loader if b is not None]
    loaded = [(v, int(s)) for b in batches for v, s in zip(b["video_id"], b["start"])]
    assert loaded == [d for d in direct if d is not None] and len(loaded) == 2
    assert ds.stats["failed_clips"] == 2                                    # once directly, once in a worker


def test_balanced_sampler_draws_both_labels_equally_on_disjoint_ranks():
    labels = [0] * 30 + [1] * 6
    dataset = SimpleNamespace(kinds=labels)
    ranks = [BalancedSampler(dataset, seed=0, num_replicas=2, rank=r) for r in range(2)]
    draws = [list(s) for s in ranks]
    assert [len(d) for d in draws] == [len(s) for s in ranks] == [18, 18]
    for d in draws:
        assert sum(labels[i % 36] for i in d) == 9
        assert len(set(d)) == len(d)                                        # a repeat draw has an index of its own
    assert not {i % 36 for i in draws[0]} & {i % 36 for i in draws[1]}
    assert {i % 36 for i in draws[0] + draws[1]} >= set(range(30, 36))      # every fake is drawn
    assert list(ranks[0]) == draws[0]
    ranks[0].set_epoch(1)
    assert list(ranks[0]) != draws[0]


def test_balanced_sampler_on_the_dataset(workspace):
    ds = make(workspace, train=True, short_tracks="pad")
    assert ds.item_labels.count(0) == 3 and ds.item_labels.count(1) == 2
    indices = list(BalancedSampler(ds, seed=0))
    drawn = [ds.item_labels[i % len(ds)] for i in indices]
    assert len(drawn) == 6 and drawn.count(1) == 3
    # the fakes' second round reads the same clips with other random starts (or augmentation), not copies
    repeat = next(i for i in indices if i >= len(ds))
    first, again = ds[repeat % len(ds)], ds[repeat]
    assert (first["video_id"], first["track_id"]) == (again["video_id"], again["track_id"])
    assert first["start"] != again["start"] or not torch.equal(first["hq"], again["hq"])
    with pytest.raises(ValueError, match="no fake clips"):
        BalancedSampler(SimpleNamespace(kinds=[0, 0]), seed=0)


def test_paired_fakes_carry_their_source_crops_at_the_same_frames(workspace):
    ds = make(workspace, train=True, short_tracks="pad", paired=True)
    items = {(item["video_id"], item["track_id"]): item for item in ds}
    fake = items[("f", 0)]
    frames = [f for _, _, f in decode(fake["hq"])]
    assert decode(fake["hq_real"]) == decode(fake["lq_real"]) == [("r", 0, f) for f in frames]
    assert "hq_real" not in items[("f", 1)] and "hq_real" not in items[("r", 0)]
    batch = collate_clips([items[("r", 0)], items[("f", 1)], fake])
    assert batch["pair_index"].tolist() == [2] and batch["hq_real"].shape == (1, T, 3, 224, 224)
    assert not any("hq_real" in item for item in make(workspace, train=False, paired=True))


def test_bad_input_is_rejected(workspace):
    root, faces = workspace
    kw = {**load_config().dataset, "seed": 0, "synthesize": "none"}
    with pytest.raises(ValueError, match="missing columns lq_path"):
        SequenceDataset(root, faces.drop(columns="lq_path"), LABELS, train=True, **kw)
    with pytest.raises(ValueError, match="short_tracks"):
        SequenceDataset(root, faces, LABELS, train=True, **(kw | {"short_tracks": "trim"}))
    with pytest.raises(ValueError, match="sources"):
        SequenceDataset(root, faces, LABELS, train=True, **(kw | {"paired": True}))


# ---------------------------------------------------------------- self-blended fakes (dataset.synthesize: sbi)

MARGIN = 1.3


def with_geometry(faces: pd.DataFrame, shift_per_frame: float = 0.0) -> pd.DataFrame:
    """Landmarks at the crop template in frame coordinates (so a frame's crop is the frame), moved right by
    ``shift_per_frame`` px per frame index: the face outline, and so the blend mask, moves with them."""
    points = template_points(224, MARGIN)
    out = faces.copy()
    dx = out["frame_index"].to_numpy(float) * shift_per_frame
    out["landmarks"] = [" ".join(f"{v:.2f}" for v in (points + [d, 0]).ravel()) for d in dx]
    out["x1"], out["y1"], out["x2"], out["y2"] = 62 + dx, 50.0, 162 + dx, 180.0
    return out


def test_self_blended_fakes_differ_from_their_real_clip_only_around_the_face(workspace):
    """Validation on reals only: each real clip is followed by its self-blended fake (same frames, label 1, a video
    id of its own); outside the face the pixels are the real clip's, inside they are not."""
    root, faces = workspace
    only_real = {"r": 0}
    ds = SequenceDataset(root, with_geometry(faces), only_real, train=False, **{
        **load_config().dataset, "clip_len": T, "seed": 0, "augment": augment_only(), "synthesize": "sbi",
        "crop_margin": MARGIN})
    reals = [item for item in ds if item["label"] == 0]
    fakes = [item for item in ds if item["label"] == 1]
    assert len(reals) == len(fakes) > 0 and ds.stats["blended"] == len(fakes)
    for real, fake in zip(reals, fakes):
        assert fake["video_id"] == "r" + BLENDED_SUFFIX and (fake["track_id"], fake["start"]) == (
            real["track_id"], real["start"])
        for stream, size in (("hq", 224), ("lq", 112)):
            diff = (fake[stream] - real[stream]).abs().amax(dim=1)          # (T, H, W)
            corner = size // 10
            assert diff[:, :corner, :corner].max() == 0 and diff[:, -corner:, -corner:].max() == 0
        assert (fake["hq"] - real["hq"]).abs()[:, :, 90:140, 90:140].mean() > 1e-3  # the blend shows on the face


def test_val_keeps_to_real_fakes_where_the_split_has_them(workspace):
    root, faces = workspace
    kw = {**load_config().dataset, "clip_len": T, "seed": 0, "augment": augment_only(), "synthesize": "sbi",
          "crop_margin": MARGIN}
    assert SequenceDataset(root, with_geometry(faces), LABELS, train=False, **kw).stats["blended"] == 0
    train = SequenceDataset(root, with_geometry(faces), LABELS, train=True, **kw)
    assert train.stats["blended"] == train.kinds.count(REAL) == 2          # one per real segment
    with pytest.raises(ValueError, match="crop_margin"):
        SequenceDataset(root, faces, LABELS, train=True, **(kw | {"crop_margin": None}))
    with pytest.raises(ValueError, match="missing columns landmarks"):
        SequenceDataset(root, faces, LABELS, train=True, **kw)


def test_blend_mask_follows_the_face_through_the_clip(workspace, monkeypatch):
    """Each frame's mask is made from that frame's face: a box moving 1 px per frame index (3 per sampled frame)
    against fixed landmarks moves the outline by as much in the crop (tests/test_synthesize.py: the mask moves with
    its outline)."""
    root, faces = workspace
    seen = []

    def spy(hq, lq, outlines, params):
        seen.append(outlines)
        return synthesize.self_blend(hq, lq, outlines, params)
    monkeypatch.setattr(dataset_mod, "self_blend", spy)
    moving = with_geometry(faces)
    moving[["x1", "x2"]] += moving[["frame_index"]].to_numpy(float)
    ds = SequenceDataset(root, moving, {"r": 0}, train=True, **{
        **load_config().dataset, "clip_len": T, "seed": 0, "augment": augment_only(), "synthesize": "sbi",
        "crop_margin": MARGIN})
    fake = next(ds[i] for i in range(len(ds)) if ds.kinds[i] == BLENDED and ds.segments[ds.clips[i][0]].track_id == 0)
    outlines = seen[-1]
    assert outlines.shape == (T, 5 + synthesize.ELLIPSE_POINTS, 2)
    np.testing.assert_allclose(np.diff(outlines[:, 5:, 0], axis=0), 3.0, atol=1e-3)   # the box's ellipse moves
    np.testing.assert_allclose(np.diff(outlines[:, :5], axis=0), 0.0, atol=1e-3)      # the landmarks stay put
    assert fake["label"] == 1


def test_balanced_sampler_gives_self_blended_fakes_their_share():
    kinds = [REAL] * 20 + [FAKE] * 4 + [BLENDED] * 20
    drawn = [kinds[i % len(kinds)] for i in BalancedSampler(SimpleNamespace(kinds=kinds), seed=0, blended_share=0.25)]
    assert drawn.count(REAL) == 22 and drawn.count(BLENDED) == round(22 * 0.25) and drawn.count(FAKE) == 22 - 6
    only_blended = [REAL] * 20 + [BLENDED] * 20
    drawn = [only_blended[i % 40] for i in BalancedSampler(SimpleNamespace(kinds=only_blended), seed=0)]
    assert drawn.count(REAL) == drawn.count(BLENDED) == 20


# ---------------------------------------------------------------- RandAugment, MixUp, CutMix

def test_randaugment_draws_once_per_clip_and_replays_it_on_the_other_stream():
    hq_in, lq_in = smooth_clip(224), smooth_clip(112)
    plain = F.to_dtype(hq_in, torch.float32, scale=True)
    changed = 0
    for seed in range(6):
        augment = ClipAugment(randaugment=(2, 9, seed))
        hq, lq = augment(hq_in, torch.Generator()), augment(lq_in, torch.Generator())
        # the input's frames are identical: a per-frame draw would give frames other ops
        assert all(torch.equal(hq[0], frame) for frame in hq) and all(torch.equal(lq[0], frame) for frame in lq)
        assert (F.resize(hq, [112, 112], antialias=True) - lq).abs().mean() < 0.03
        assert torch.equal(augment(hq_in, torch.Generator()), hq)   # the seed decides the draw
        changed += (hq - plain).abs().mean() > 0.02
    assert changed >= 4                                            # a few draws may pick Identity twice
    drawn = ClipAugment.sample(augment_only("randaugment", randaugment_ops=3, randaugment_magnitude=5),
                               torch.Generator().manual_seed(0))
    assert drawn.randaugment[:2] == (3, 5) and drawn.flip is False


def test_with_probability_zero_mixing_and_randaugment_change_no_item(workspace):
    """Configs that predate the new keys, and the keys at 0, give the same items bit for bit, batched too."""
    with_keys = load_config().dataset.augment | {"mixup_alpha": 0.7, "cutmix_alpha": 3.0}
    before = {k: v for k, v in with_keys.items() if k in PROBABILITIES[:7]}
    old, new = make(workspace, train=True, augment=before), make(workspace, train=True, augment=with_keys)
    for epoch in range(3):
        old.set_epoch(epoch)
        new.set_epoch(epoch)
        batches = collate_clips([old[i] for i in range(6)]), collate_clips([new[i] for i in range(6)])
        assert batches[0].keys() == batches[1].keys()
        for key in ("hq", "lq", "label", "start"):
            assert torch.equal(batches[0][key], batches[1][key])


def mixed_item(ds, kind: str) -> tuple[dict, dict, dict, object]:
    """The first item mixed by ``kind`` whose partner has the other label: (mixed, own, partner, plan)."""
    for index in range(200):
        plan = ds.mix_plan(index, 112)
        if plan is None or (plan.box is None) != (kind == "mixup"):
            continue
        own = ds._item(index % len(ds), dataset_mod.seeded_generator(0, ds.epoch, index))
        partner = ds._item(plan.partner, dataset_mod.seeded_generator(0, ds.epoch, index, dataset_mod.PARTNER_STREAM))
        if own["label"] != partner["label"] and 0.2 < plan.ratio < 0.8:
            return ds[index], own, partner, plan
    raise AssertionError(f"no {kind} item with a partner of the other label")


def test_mixup_mixes_every_frame_and_both_streams_with_one_partner_and_ratio(workspace):
    ds = make(workspace, train=True, augment=augment_only("mixup", mixup_alpha=1.0))
    mixed, own, partner, plan = mixed_item(ds, "mixup")
    share = plan.ratio if own["label"] == 1 else 1 - plan.ratio     # the fake's share of the pixels
    assert mixed["label"].item() == pytest.approx(share, abs=1e-6)
    assert (mixed["video_id"], mixed["start"]) == (own["video_id"], own["start"])
    for stream in ("hq", "lq"):
        a, b = own[stream], partner[stream]
        assert decode(a) != decode(b)                                # two different clips were mixed
        # the ratio read back from the pixels of each frame, without trusting the plan
        ratio = ((mixed[stream] - b) * (a - b)).sum(dim=(1, 2, 3)) / ((a - b) ** 2).sum(dim=(1, 2, 3))
        assert torch.allclose(ratio, torch.full((T,), plan.ratio), atol=1e-4)
        assert torch.allclose(mixed[stream], plan.ratio * a + (1 - plan.ratio) * b, atol=1e-6)


def test_cutmix_pastes_the_same_box_into_every_frame_of_both_streams_at_their_scale(workspace):
    ds = make(workspace, train=True, augment=augment_only("cutmix", cutmix_alpha=1.0))
    mixed, own, partner, plan = mixed_item(ds, "cutmix")
    boxes = {}
    for stream in ("hq", "lq"):
        pasted = (mixed[stream] == partner[stream]).all(dim=1) & (mixed[stream] != own[stream]).any(dim=1)
        kept = (mixed[stream] == own[stream]).all(dim=1)
        assert bool((pasted | kept).all())                          # every pixel is one clip's or the other's
        assert torch.equal(pasted, pasted[:1].expand_as(pasted))    # the same box in every frame
        boxes[stream] = pasted[0]
        assert 1 - pasted[0].float().mean().item() == pytest.approx(plan.ratio)
    assert torch.equal(boxes["hq"][::2, ::2], boxes["lq"])          # the LQ box is the HQ box at half scale
    rows, cols = boxes["lq"].any(dim=1).nonzero().flatten(), boxes["lq"].any(dim=0).nonzero().flatten()
    assert boxes["lq"][rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all()   # a rectangle
    share = plan.ratio if own["label"] == 1 else 1 - plan.ratio
    assert mixed["label"].item() == pytest.approx(share, abs=1e-6)


def test_mixing_is_reproducible_training_only_and_leaves_pairs_alone(workspace):
    augment = augment_only("mixup", "flip", mixup_alpha=1.0)
    first, again = make(workspace, train=True, augment=augment), make(workspace, train=True, augment=augment)
    assert all(torch.equal(a["hq"], b["hq"]) and a["label"] == b["label"] for a, b in zip(first, again))
    assert {item["label"].item() for item in first} - {0.0, 1.0}    # mixed targets
    val = make(workspace, train=False, augment=augment)
    assert {item["label"].item() for item in val} == {0.0, 1.0}
    paired = make(workspace, train=True, paired=True, augment=augment)
    assert all(item["label"].item() in (0.0, 1.0) for item in paired if "hq_real" in item)


def test_mixup_and_cutmix_together_may_not_exceed_certainty():
    from dfpipe.pipeline.config import ConfigError
    load_config(overrides=[{"dataset": {"augment": {"mixup": 0.5, "cutmix": 0.5}}}])
    with pytest.raises(ConfigError, match="mixup \\+ dataset.augment.cutmix must not exceed 1"):
        load_config(overrides=[{"dataset": {"augment": {"mixup": 0.6, "cutmix": 0.5}}}])
