"""Training-pair manifest: pairing, leak-free and stable splits, crop digests."""
from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest

from dfpipe.pipeline.config import load_config
from dfpipe.stages.discover import discover
from dfpipe.stages.pairs import COLUMNS, build_training_pairs, crop_digests, pairs_digest, split_videos

VIDEO_COLUMNS = ["video_id", "path", "label", "source_id", "group", "split", "dataset", "method", "size", "sha256",
                 "frames", "fps", "width", "height", "codec"]
FACE_COLUMNS = ["video_id", "frame_index", "timestamp", "status", "track_id", "x1", "y1", "x2", "y2", "prob",
                "landmarks", "scale", "mode", "hq_path", "lq_path", "hq_sha256", "lq_sha256"]


def video(video_id, label, source_id="", group="", split="", dataset="demo", method=""):
    return {"video_id": video_id, "path": f"videos/{video_id}.mp4", "label": label, "source_id": source_id,
            "group": group, "split": split, "dataset": dataset, "method": method or ("" if label == "real" else "fs"),
            "size": 1000, "sha256": "0" * 64, "frames": 30, "fps": 30.0, "width": 64, "height": 48, "codec": "h264"}


def videos_table(rows) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=VIDEO_COLUMNS)


def faces_table(video_ids, frames=3) -> pd.DataFrame:
    """Two tracks on every frame but the last, which has no face; crop hashes unique per crop."""
    rows = []
    for vid in video_ids:
        for f in range(frames):
            if f == frames - 1:
                rows.append({"video_id": vid, "frame_index": f * 3, "status": "no_face", "track_id": -1})
                continue
            for track in (0, 1):
                rows.append({"video_id": vid, "frame_index": f * 3, "status": "face", "track_id": track,
                             "hq_sha256": f"hq-{vid}-{f}-{track}", "lq_sha256": f"lq-{vid}-{f}-{track}"})
    return pd.DataFrame(rows, columns=FACE_COLUMNS)


def pairs_args(**overrides):
    return {**load_config().pairs, **overrides}


def build(videos, faces=None, previous=None, **overrides):
    faces = faces_table([]) if faces is None else faces
    return build_training_pairs(videos, faces, previous, **pairs_args(**overrides))


def filler(n, prefix="g", fakes=True, dataset="demo"):
    """n identity groups: a real, plus (if fakes) one fake made from it."""
    rows = []
    for i in range(n):
        rows.append(video(f"{prefix}{i}", "real", group=f"{prefix}:{i}", dataset=dataset))
        if fakes:
            rows.append(video(f"{prefix}{i}_x", "fake", source_id=f"{prefix}{i}", group=f"{prefix}:{i}",
                              dataset=dataset))
    return rows


def split_of_group(pairs) -> dict[str, str]:
    per_group = pairs.groupby("group").split.agg(set)
    assert (per_group.map(len) == 1).all(), "a group spans several splits"
    return per_group.map(lambda s: next(iter(s))).to_dict()


def assert_leak_free(videos, pairs):
    """No video in two splits; every identity label and every fake/source link inside one split."""
    splits = split_videos(pairs)
    assert not (splits["train"] & splits["val"] or splits["train"] & splits["test"] or splits["val"] & splits["test"])
    where = {v: s for s, ids in splits.items() for v in ids}
    assert set(where) == set(videos.video_id)
    labelled = videos[videos.group != ""]
    assert (labelled.assign(split=labelled.video_id.map(where)).groupby("group").split.nunique() == 1).all()
    linked = videos[(videos.label == "fake") & videos.source_id.isin(where)]
    assert (linked.video_id.map(where) == linked.source_id.map(where)).all()


def test_ffpp_mutual_pairs_merge_into_one_group_with_both_reals():
    rows = [video("183", "real", group="ffpp:183", dataset="ffpp"),
            video("253", "real", group="ffpp:253", dataset="ffpp"),
            video("183_253", "fake", source_id="183", group="ffpp:253", dataset="ffpp", method="Deepfakes"),
            video("253_183", "fake", source_id="253", group="ffpp:253", dataset="ffpp", method="Deepfakes")]
    videos = videos_table(rows + filler(40))
    for seed in range(6):
        pairs = build(videos, seed=seed, val_fraction=0.3, test_fraction=0.2)
        mine = pairs[pairs.group == "ffpp:183"]
        assert mine[["fake_id", "real_id", "method"]].values.tolist() == [["183_253", "183", "Deepfakes"],
                                                                           ["253_183", "253", "Deepfakes"]]
        assert mine.split.nunique() == 1
        split = mine.split.iloc[0]
        assert {"183", "253", "183_253", "253_183"} <= split_videos(pairs)[split]
        assert_leak_free(videos, pairs)


def test_dfdc_fakes_with_missing_originals_are_listed_and_grouped_by_original():
    """Unlabelled fakes of one missing original share a group (named by its smallest video id)."""
    videos = videos_table([video("a.mp4", "fake", source_id="orig.mp4", split="train", dataset="dfdc"),
                           video("b.mp4", "fake", source_id="orig.mp4", dataset="dfdc"),
                           video("c.mp4", "fake", source_id="other.mp4", split="train", dataset="dfdc")])
    pairs = build(videos, val_fraction=0.0, test_fraction=0.0)
    assert pairs[["fake_id", "real_id", "group", "split"]].values.tolist() == [
        ["a.mp4", "", "a.mp4", "train"], ["b.mp4", "", "a.mp4", "train"], ["c.mp4", "", "c.mp4", "train"]]
    assert list(pairs.columns) == COLUMNS


def test_dfdc_official_train_split_is_carved_for_val_and_test():
    """DFDC's metadata calls every video train: binding that left no val at all."""
    videos = videos_table(filler(40, "d", dataset="dfdc") + filler(20, "r", fakes=False, dataset="dfdc"))
    videos["split"] = "train"
    pairs = build(videos, val_fraction=0.2, test_fraction=0.1)
    shares = pairs.drop_duplicates("group").split.value_counts()
    assert set(shares.index) == {"train", "val", "test"} and shares["val"] >= 6, shares.to_dict()
    assert pairs.attrs["notes"] == ["dfdc: no official val or test split: carved from its official train split by "
                                    "pairs.seed and the fractions"]
    # A dataset that names its own val and test keeps its train split whole.
    ffpp = videos_table([{**v, "dataset": "ffpp", "split": "train"} for v in filler(10, "f")]
                        + [video("v", "real", group="v", split="val", dataset="ffpp"),
                           video("t", "real", group="t", split="test", dataset="ffpp")])
    kept = build(ffpp, val_fraction=0.5)
    assert set(kept.split[kept.group.str.startswith("f:")]) == {"train"} and kept.attrs["notes"] == []


def test_celebdf_swaps_do_not_collapse_into_one_group(tmp_path):
    """Identity i's video with identity i+1's face, in a ring: grouping a fake with both identities made one group of
    every video, which the split could not divide (val had no fake, or nothing)."""
    n = 12
    for i in range(n):
        for name in (f"Celeb-real/id{i}_0000.mp4", f"Celeb-synthesis/id{i}_id{(i + 1) % n}_0000.mp4"):
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_bytes(b"")
    found = discover(tmp_path)
    videos = pd.DataFrame(found.rows).assign(**{c: "" for c in VIDEO_COLUMNS[8:]})
    assert videos.group.nunique() == n
    splits = split_videos(build(videos, val_fraction=0.2, test_fraction=0.0))
    for split in ("train", "val"):
        assert {v.split("/")[0] for v in splits[split]} == {"Celeb-real", "Celeb-synthesis"}, split
    assert len(splits["train"]) >= n


def test_one_group_holding_most_videos_is_noted():
    videos = videos_table(filler(6, "g") + [video(f"g0_{k}", "fake", source_id="g0", group="g:0") for k in range(30)])
    notes = build(videos, val_fraction=0.2, test_fraction=0.1).attrs["notes"]
    assert notes == ["group 'g:0' holds 32 of 42 videos: the splits cannot follow pairs.val_fraction/test_fraction "
                     "(its identities or sources connect most videos)"]


def test_reals_without_fakes_get_their_own_row():
    videos = videos_table([video("r1", "real", group="p:1", split="train"),
                           video("f1", "fake", source_id="r1", group="p:1", split="train"),
                           video("r2", "real", group="p:2", split="val", method="original")])
    pairs = build(videos)
    assert pairs[["fake_id", "real_id", "split", "method"]].values.tolist() == [
        ["f1", "r1", "train", "fs"], ["", "r2", "val", "original"]]


def test_official_splits_are_used_and_conflicts_take_the_most_restrictive():
    videos = videos_table([video("t", "real", group="a", split="train"), video("v", "real", group="b", split="val"),
                           video("x", "real", group="c", split="test"),
                           video("y", "real", group="d", split="train"),
                           video("y_f", "fake", source_id="y", group="d", split="val")])
    pairs = build(videos, val_fraction=0.5, test_fraction=0.4)
    assert split_of_group(pairs) == {"a": "train", "b": "val", "c": "test", "d": "val"}
    assert pairs.attrs["notes"] == ["group 'd' has official splits ['train', 'val']: using val"]
    # A previous manifest outranks the official split (stability), and says so.
    again = build(videos, previous=pairs.assign(split=pairs.split.where(pairs.group != "a", "test")))
    assert split_of_group(again) == {"a": "test", "b": "val", "c": "test", "d": "val"}
    assert again.attrs["notes"] == ["group 'a' keeps previous split test over official ['train']"]


def test_seeded_split_is_deterministic_and_depends_on_seed():
    videos = videos_table(filler(50))
    first, again = build(videos, seed=3), build(videos, seed=3)
    pd.testing.assert_frame_equal(first, again)
    assert split_of_group(first) != split_of_group(build(videos, seed=4))


@pytest.mark.parametrize("seed", range(8))
def test_small_dataset_gets_val_with_both_labels(seed):
    """The demo: 10 groups with a fake and 6 reals without one; val must hold both kinds."""
    videos = videos_table(filler(10, "f") + filler(6, "r", fakes=False))
    pairs = build(videos, seed=seed, val_fraction=0.15, test_fraction=0.0)
    val = pairs[pairs.split == "val"]
    assert (val.fake_id != "").any() and (val.fake_id == "").any()
    assert (pairs.split == "train").sum() >= 10
    assert set(pairs.split) == {"train", "val"}


@pytest.mark.parametrize("seed", range(4))
def test_three_groups_per_label_fill_all_three_splits(seed):
    videos = videos_table(filler(3, "f") + filler(3, "r", fakes=False))
    pairs = build(videos, seed=seed, val_fraction=0.1, test_fraction=0.1)
    for has_fake, rows in pairs.groupby(pairs.fake_id != ""):
        assert sorted(rows.split) == ["test", "train", "val"], has_fake


def test_seeded_split_respects_fractions_per_label():
    videos = videos_table(filler(200, "f") + filler(200, "r", fakes=False))
    pairs = build(videos, seed=0, val_fraction=0.15, test_fraction=0.1)
    for _, rows in pairs.groupby(pairs.fake_id != ""):
        share = rows.drop_duplicates("group").split.value_counts(normalize=True)
        assert abs(share["val"] - 0.15) < 0.06 and abs(share["test"] - 0.1) < 0.06, share.to_dict()


def test_new_groups_keep_every_old_assignment_and_ignore_each_other():
    old = videos_table(filler(30, "a"))
    previous = build(old, seed=1, val_fraction=0.3, test_fraction=0.2)
    # New groups, plus a second fake of an old real (same group, so it must follow its source).
    added = filler(30, "b") + [video("a0_y", "fake", source_id="a0", group="a:0")]
    grown = build(videos_table(old.to_dict("records") + added), previous=previous, seed=1, val_fraction=0.3,
                  test_fraction=0.2)
    before = previous.set_index(["group", "real_id", "fake_id"]).split
    after = grown.set_index(["group", "real_id", "fake_id"]).split
    assert after.loc[before.index].equals(before)
    assert after.loc[("a:0", "a0", "a0_y")] == before.loc[("a:0", "a0", "a0_x")]
    # Another batch of new groups arriving at the same time does not move the first batch.
    crowded = build(videos_table(old.to_dict("records") + added + filler(30, "c")), previous=previous, seed=1,
                    val_fraction=0.3, test_fraction=0.2)
    assert crowded.set_index(["group", "real_id", "fake_id"]).split.loc[after.index].equals(after)


def test_previous_split_survives_a_csv_round_trip_and_a_merge_renaming_the_group():
    old = videos_table(filler(20, "m"))
    previous = build(old, seed=2, val_fraction=0.4)
    csv = io.StringIO(previous.to_csv(index=False))
    reread = pd.read_csv(csv)  # default dtypes: '' comes back as NaN
    assert pairs_digest(reread) == pairs_digest(previous)
    # A new fake labelled with a new, smaller group name pulls m:5 under that name; its split must stay.
    newcomer = video("m5_z", "fake", source_id="m5", group="a:new")
    grown = build(videos_table(old.to_dict("records") + [newcomer]), previous=reread, seed=2, val_fraction=0.4)
    old_split = previous.loc[previous.real_id == "m5", "split"].iloc[0]
    assert set(grown.loc[grown.group == "a:new", "split"]) == {old_split}
    assert set(grown.loc[grown.group == "a:new", "fake_id"]) == {"m5_x", "m5_z"}


def test_merging_groups_from_different_previous_splits_is_noted():
    old = videos_table(filler(20, "m"))
    previous = build(old, seed=2, val_fraction=0.4)
    split = previous.drop_duplicates("group").set_index("group").split
    train_group, val_group = split[split == "train"].index[0], split[split == "val"].index[0]
    bridge = video("bridge", "fake", source_id=train_group.replace(":", ""), group=val_group)
    grown = build(videos_table(old.to_dict("records") + [bridge]), previous=previous, seed=2, val_fraction=0.4)
    assert_leak_free(videos_table(old.to_dict("records") + [bridge]), grown)
    merged = min(train_group, val_group)
    assert set(grown.loc[grown.group == merged, "split"]) == {"val"}
    assert grown.attrs["notes"] == [f"group '{merged}' merges previously separate splits ['train', 'val']: now val"]


def test_crop_digest_tracks_every_crop_and_ignores_row_order():
    faces = faces_table(["v1", "v2"])
    digests = crop_digests(faces)
    assert crop_digests(faces.sample(frac=1, random_state=0)) == digests
    changed = faces.copy()
    changed.loc[(changed.video_id == "v2") & (changed.frame_index == 3) & (changed.track_id == 1), "lq_sha256"] = "x"
    new = crop_digests(changed)
    assert new["v1"] == digests["v1"] and new["v2"] != digests["v2"]

    videos = videos_table([video("v1", "real", group="g", split="train"),
                           video("v2", "fake", source_id="v1", group="g", split="train"),
                           video("v3", "real", group="h", split="train")])
    pairs, repaired = build(videos, faces), build(videos, changed)
    assert pairs.real_digest.tolist() == [digests["v1"], ""]
    assert pairs.fake_digest.tolist() == [digests["v2"], ""]
    assert repaired.fake_digest.iloc[0] == new["v2"]
    assert pairs_digest(pairs) != pairs_digest(repaired)
    assert pairs_digest(pairs.iloc[::-1]) == pairs_digest(pairs)


def test_bad_input_names_the_file():
    with pytest.raises(ValueError, match=r"^manifests/videos.csv: video 'x' has label 'FAKE'$"):
        build(videos_table([video("x", "FAKE")]))
    with pytest.raises(ValueError, match=r"^manifests/videos.csv: fake 'b' names fake 'a' as its source$"):
        build(videos_table([video("a", "fake"), video("b", "fake", source_id="a")]))
    with pytest.raises(ValueError, match=r"^manifests/faces.csv: missing columns hq_sha256$"):
        build(videos_table([video("a", "real")]), faces_table(["a"]).drop(columns="hq_sha256"))
    with pytest.raises(ValueError, match="pairs config"):
        build(videos_table([video("a", "real")]), val_fraction=0.6, test_fraction=0.5)


def random_videos(rng) -> pd.DataFrame:
    """Reals with random identity labels, fakes with random (sometimes missing) sources and their own labels."""
    n_real, n_fake = rng.integers(1, 30), rng.integers(0, 40)
    labels = [f"id{i}" for i in range(rng.integers(1, 25))] + [""]
    rows = [video(f"r{i}", "real", group=rng.choice(labels), split=rng.choice(["", "", "", "train", "val", "test"]))
            for i in range(n_real)]
    for i in range(n_fake):
        source = f"r{rng.integers(0, n_real)}" if rng.random() < 0.8 else f"gone{rng.integers(0, 3)}"
        rows.append(video(f"f{i}", "fake", source_id=source, group=rng.choice(labels),
                          split=rng.choice(["", "", "", "train", "val", "test"])))
    return videos_table(rows)


@pytest.mark.parametrize("seed", range(20))
def test_no_video_crosses_splits_on_random_inputs(seed):
    rng = np.random.default_rng(seed)
    videos = random_videos(rng)
    pairs = build(videos, seed=seed, val_fraction=0.2, test_fraction=0.15)
    assert_leak_free(videos, pairs)
    more = videos_table(videos.to_dict("records") + random_videos(rng).assign(
        video_id=lambda t: "n" + t.video_id, source_id=lambda t: np.where(t.source_id != "", "n" + t.source_id, ""),
        group=lambda t: np.where(t.group != "", "n" + t.group, "")).to_dict("records"))
    grown = build(more, previous=pairs, seed=seed, val_fraction=0.2, test_fraction=0.15)
    assert_leak_free(more, grown)
    old = pairs.set_index(["real_id", "fake_id"]).split
    assert grown.set_index(["real_id", "fake_id"]).split.loc[old.index].equals(old)


def test_components_are_named_by_their_smallest_name_whatever_the_link_order():
    from dfpipe.stages.components import smallest_in_component
    links = [["b", "a"], ["c"], ["d", "c"], ["e", "b"], ["f"]]
    expected = {"a": "a", "b": "a", "e": "a", "c": "c", "d": "c", "f": "f"}
    assert smallest_in_component(links) == expected
    assert smallest_in_component([list(reversed(g)) for g in reversed(links)]) == expected
    assert smallest_in_component([]) == {}
