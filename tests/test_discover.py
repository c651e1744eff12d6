"""Discovery reads only names and metadata, so fixture trees hold tiny dummy files instead of real videos."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from dfpipe.stages.discover import ROW_KEYS, DiscoveryError, discover


def touch(root: Path, *names: str) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"\x00 not decoded")


def by_id(discovery) -> dict[str, dict]:
    return {r["video_id"]: r for r in discovery.rows}


def ffpp_tree(root: Path, compressions=("c23",)) -> Path:
    for c in compressions:
        touch(root, *(f"original_sequences/youtube/{c}/videos/{n}.mp4" for n in ("183", "253", "000", "999")))
        for method in ("Deepfakes", "Face2Face"):
            touch(root, *(f"manipulated_sequences/{method}/{c}/videos/{n}.mp4" for n in ("183_253", "253_183")))
        touch(root, f"manipulated_sequences/Deepfakes/{c}/videos/000_003.mp4")
    return root


# --- FaceForensics++ ---------------------------------------------------------------------------------------

def test_ffpp_rows_ids_labels_sources_methods(tmp_path):
    d = discover(ffpp_tree(tmp_path))
    assert d.layout == "ffpp"
    assert [r["video_id"] for r in d.rows] == [
        "Deepfakes/000_003", "Deepfakes/183_253", "Deepfakes/253_183", "Face2Face/183_253", "Face2Face/253_183",
        "youtube/000", "youtube/183", "youtube/253", "youtube/999"]
    rows = by_id(d)
    assert all(tuple(r) == ROW_KEYS for r in d.rows)
    assert rows["Deepfakes/183_253"] == {
        "video_id": "Deepfakes/183_253",
        "path": str(tmp_path / "manipulated_sequences/Deepfakes/c23/videos/183_253.mp4"),
        "label": "fake", "source_id": "youtube/183", "group": "ffpp:183", "split": "",
        "dataset": "ffpp", "method": "Deepfakes"}
    assert rows["Face2Face/253_183"]["source_id"] == "youtube/253"
    assert rows["Face2Face/253_183"]["method"] == "Face2Face"
    assert rows["youtube/183"] | {"path": ""} == {
        "video_id": "youtube/183", "path": "", "label": "real", "source_id": "", "group": "ffpp:183",
        "split": "", "dataset": "ffpp", "method": ""}
    # the face donor 003 is not on disk: the fake keeps its derived source, and a note counts it
    assert rows["Deepfakes/000_003"]["source_id"] == "youtube/000"
    assert d.notes == []


def test_ffpp_mutual_pairs_share_one_group(tmp_path):
    groups = {r["video_id"]: r["group"] for r in discover(ffpp_tree(tmp_path)).rows}
    pair = {"youtube/183", "youtube/253", "Deepfakes/183_253", "Deepfakes/253_183", "Face2Face/183_253",
            "Face2Face/253_183"}
    assert {groups[v] for v in pair} == {"ffpp:183"}
    assert groups["youtube/000"] == groups["Deepfakes/000_003"] == "ffpp:000"
    assert groups["youtube/999"] == "ffpp:999"


def test_ffpp_several_compressions_go_into_the_id(tmp_path):
    rows = by_id(discover(ffpp_tree(tmp_path, ("c23", "c40"))))
    assert len(rows) == 18
    assert rows["Deepfakes/c40/183_253"]["source_id"] == "youtube/c40/183"
    assert rows["Deepfakes/c23/183_253"]["path"].endswith("c23/videos/183_253.mp4")
    assert rows["youtube/c23/253"]["group"] == rows["Face2Face/c40/183_253"]["group"] == "ffpp:183"


def test_ffpp_skips_masks_hidden_and_non_video_files(tmp_path):
    ffpp_tree(tmp_path)
    touch(tmp_path, "manipulated_sequences/Deepfakes/masks/videos/183_253.mp4",
          "original_sequences/youtube/c23/videos/._183.mp4", "original_sequences/youtube/c23/videos/183.json",
          "original_sequences/youtube/c23/videos/777.MOV")
    ids = [r["video_id"] for r in discover(tmp_path).rows]
    assert len(ids) == 10 and "youtube/777" in ids


def test_ffpp_official_splits_cover_pairs_and_their_fakes(tmp_path):
    ffpp_tree(tmp_path)
    (tmp_path / "train.json").write_text(json.dumps([["183", "253"]]))
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "test.json").write_text(json.dumps([["003", "000"]]))
    splits = {r["video_id"]: r["split"] for r in discover(tmp_path).rows}
    assert splits == {"Deepfakes/000_003": "test", "Deepfakes/183_253": "train", "Deepfakes/253_183": "train",
                      "Face2Face/183_253": "train", "Face2Face/253_183": "train", "youtube/000": "test",
                      "youtube/183": "train", "youtube/253": "train", "youtube/999": ""}


def test_ffpp_split_files_that_disagree_are_rejected(tmp_path):
    ffpp_tree(tmp_path)
    (tmp_path / "train.json").write_text(json.dumps([["183", "253"]]))
    (tmp_path / "val.json").write_text(json.dumps([["253", "999"]]))
    with pytest.raises(DiscoveryError, match=r"val\.json: video 253 is also in the train split"):
        discover(tmp_path)


def test_ffpp_deepfakedetection_and_unparsable_names(tmp_path):
    touch(tmp_path, "original_sequences/actors/c23/videos/01__meeting_serious.mp4",
          "original_sequences/actors/c23/videos/02__walking.mp4",
          "manipulated_sequences/DeepFakeDetection/c23/videos/01_02__meeting_serious__YVGY8LOK.mp4",
          "manipulated_sequences/FaceShifter/c23/videos/odd name é.mp4")
    d = discover(tmp_path)
    rows = by_id(d)
    fake = rows["DeepFakeDetection/01_02__meeting_serious__YVGY8LOK"]
    assert fake["source_id"] == "actors/01__meeting_serious"
    assert fake["method"] == "DeepFakeDetection"
    # Grouped with the actor whose video it was made from, not with its face donor too (swaps chain all actors).
    assert fake["group"] == rows["actors/01__meeting_serious"]["group"] == "ffpp:actor01"
    assert rows["actors/02__walking"]["group"] == "ffpp:actor02"
    odd = rows["FaceShifter/odd name é"]
    assert (odd["label"], odd["source_id"], odd["group"]) == ("fake", "", "ffpp:FaceShifter/odd name é")
    assert d.notes[0] == "1 FF++ fake(s) named neither TARGET_FACE nor DeepFakeDetection-style"
    assert d.notes[1].startswith("DeepFakeDetection: each fake is grouped with the actor whose video it was made from")
    assert d.notes[2:] == ["1 fake video(s) have no known source (e.g. FaceShifter/odd name é)"]


def test_ffpp_fake_without_its_real_on_disk_is_noted(tmp_path):
    touch(tmp_path, "manipulated_sequences/Deepfakes/c23/videos/183_253.mp4")
    d = discover(tmp_path)
    assert d.rows[0]["source_id"] == "youtube/183"
    assert d.notes == ["1 fake video(s) have a source that is not on disk (e.g. youtube/183)"]


# --- DFDC --------------------------------------------------------------------------------------------------

def write_metadata(folder: Path, entries: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metadata.json").write_text(json.dumps(entries))


def test_dfdc_sample_quirk_sources_missing_from_disk(tmp_path):
    write_metadata(tmp_path, {
        "aaa.mp4": {"label": "FAKE", "split": "train", "original": "orig1.mp4"},
        "bbb.mp4": {"label": "FAKE", "split": "train", "original": "orig1.mp4"},
        "ccc.mp4": {"label": "REAL", "split": "train", "original": None},
        "ddd.mp4": {"label": "FAKE", "split": "train", "original": "orig2.mp4"}})
    touch(tmp_path, "aaa.mp4", "bbb.mp4", "unlisted.mp4")
    d = discover(tmp_path)
    assert d.layout == "dfdc"
    assert [(r["video_id"], r["label"], r["source_id"], r["group"], r["split"], r["method"]) for r in d.rows] == [
        ("aaa", "fake", "orig1", "dfdc:orig1", "train", "dfdc"),
        ("bbb", "fake", "orig1", "dfdc:orig1", "train", "dfdc")]
    assert d.notes == [f"{tmp_path / 'metadata.json'}: 1 video(s) not in metadata.json skipped (e.g. unlisted.mp4)",
                       f"{tmp_path / 'metadata.json'}: 2 listed video(s) are not on disk",
                       "2 fake video(s) have a source that is not on disk (e.g. orig1)"]


def test_dfdc_parts_in_sub_folders(tmp_path):
    write_metadata(tmp_path / "dfdc_train_part_0", {
        "real.mp4": {"label": "REAL", "split": "train"},
        "fake.mp4": {"label": "FAKE", "split": "train", "original": "real.mp4"},
        "gone.mp4": {"label": "FAKE", "split": "public_test", "original": "absent.mp4"}})
    write_metadata(tmp_path / "more" / "part_1", {"other.mp4": {"label": "fake", "split": "val",
                                                              "original": "real.mp4"}})
    touch(tmp_path, "dfdc_train_part_0/real.mp4", "dfdc_train_part_0/fake.mp4", "dfdc_train_part_0/gone.mp4",
          "more/part_1/other.mp4")
    rows = by_id(discover(tmp_path))
    assert rows["dfdc_train_part_0/fake"]["source_id"] == "dfdc_train_part_0/real"
    assert rows["more/part_1/other"]["source_id"] == "dfdc_train_part_0/real"
    assert rows["dfdc_train_part_0/gone"]["source_id"] == "dfdc_train_part_0/absent"
    assert {rows[v]["group"] for v in ("dfdc_train_part_0/real", "dfdc_train_part_0/fake", "more/part_1/other")} \
        == {"dfdc:real"}
    assert [rows[v]["split"] for v in sorted(rows)] == ["train", "", "train", "val"]
    assert rows["dfdc_train_part_0/real"]["method"] == ""


def test_dfdc_unreadable_metadata_and_bad_label(tmp_path):
    (tmp_path / "metadata.json").write_text("{not json")
    touch(tmp_path, "a.mp4")
    with pytest.raises(DiscoveryError, match=r"metadata\.json: not valid JSON"):
        discover(tmp_path)
    write_metadata(tmp_path, {"a.mp4": {"label": "MAYBE"}})
    with pytest.raises(DiscoveryError, match=r"metadata\.json: entry 'a\.mp4' has no REAL/FAKE label"):
        discover(tmp_path, "dfdc")


# --- Celeb-DF ----------------------------------------------------------------------------------------------

def celebdf_tree(root: Path) -> Path:
    touch(root, "Celeb-real/id0_0000.mp4", "Celeb-real/id1_0003.mp4", "Celeb-real/id2_0001.mp4",
          "Celeb-synthesis/id0_id1_0000.mp4", "Celeb-synthesis/id2_id3_0001.mp4",
          "YouTube-real/00000.mp4", "YouTube-real/00170.mp4")
    return root


def test_celebdf_sources_groups_methods(tmp_path):
    d = discover(celebdf_tree(tmp_path))
    assert d.layout == "celebdf"
    rows = by_id(d)
    fake = rows["Celeb-synthesis/id0_id1_0000"]
    assert (fake["label"], fake["source_id"], fake["method"]) == ("fake", "Celeb-real/id0_0000", "Celeb-synthesis")
    assert {rows[v]["group"] for v in ("Celeb-real/id0_0000", "Celeb-synthesis/id0_id1_0000")} == {"celebdf:id0"}
    assert rows["Celeb-real/id1_0003"]["group"] == "celebdf:id1"  # the face donor stays in its own group
    assert rows["Celeb-synthesis/id2_id3_0001"]["group"] == rows["Celeb-real/id2_0001"]["group"] == "celebdf:id2"
    assert rows["YouTube-real/00000"]["group"] == "celebdf:YouTube-real/00000"
    assert rows["YouTube-real/00170"]["group"] == "celebdf:YouTube-real/00170"
    assert {r["split"] for r in d.rows} == {""}
    assert rows["YouTube-real/00000"]["label"] == "real" and rows["YouTube-real/00000"]["method"] == ""


def test_celebdf_official_test_list(tmp_path):
    celebdf_tree(tmp_path)
    (tmp_path / "List_of_testing_videos.txt").write_text(
        "1 YouTube-real/00170.mp4\n0 Celeb-synthesis/id2_id3_0001.mp4\n\n")
    splits = {r["video_id"]: r["split"] for r in discover(tmp_path).rows}
    assert [v for v, s in splits.items() if s == "test"] == ["Celeb-synthesis/id2_id3_0001", "YouTube-real/00170"]
    assert sum(s == "train" for s in splits.values()) == 5
    # With the official list, groups are single videos (a fake joins its source through source_id, in pairs).
    rows = by_id(discover(tmp_path))
    assert rows["Celeb-real/id0_0000"]["group"] == "celebdf:Celeb-real/id0_0000"
    assert rows["Celeb-real/id2_0001"]["group"] != rows["Celeb-synthesis/id2_id3_0001"]["group"]



# --- real/ + fake/ folders ---------------------------------------------------------------------------------

def test_folders_pair_fakes_with_reals_by_stem(tmp_path):
    touch(tmp_path, "real/RealBateman.mp4", "fake/FakeBateman.mp4", "Real/nested/real_003.avi",
          "FAKE/fake_003.mkv", "real/Real Überman.webm", "fake/fake-überman.mp4", "fake/FakeNobody.mp4")
    d = discover(tmp_path)
    assert d.layout == "folders"
    rows = by_id(d)
    assert set(rows) == {"real/RealBateman", "fake/FakeBateman", "Real/nested/real_003", "FAKE/fake_003",
                         "real/Real Überman", "fake/fake-überman", "fake/FakeNobody"}
    assert rows["fake/FakeBateman"]["source_id"] == "real/RealBateman"
    assert rows["FAKE/fake_003"]["source_id"] == "Real/nested/real_003"
    assert rows["fake/fake-überman"]["source_id"] == "real/Real Überman"
    assert rows["fake/fake-überman"]["group"] == rows["real/Real Überman"]["group"] == "folders:überman"
    assert rows["FAKE/fake_003"]["group"] == "folders:003"
    assert rows["fake/FakeNobody"]["source_id"] == ""
    assert [r["label"] for r in d.rows] == ["fake", "real", "fake", "fake", "fake", "real", "real"]
    assert d.notes == ["1 fake video(s) have no known source (e.g. fake/FakeNobody)"]


def test_folders_ambiguous_match_leaves_source_unknown(tmp_path):
    touch(tmp_path, "real/a/Real1.mp4", "real/b/real_1.mp4", "fake/fake1.mp4")
    d = discover(tmp_path)
    assert by_id(d)["fake/fake1"]["source_id"] == ""
    assert d.notes[0] == "1 fake(s) match several reals by name; their source is left unknown"


# --- CSV ---------------------------------------------------------------------------------------------------

def test_csv_paths_labels_sources_groups(tmp_path):
    data = tmp_path / "lists"
    outside = tmp_path / "elsewhere"
    touch(data, "vids/a real.mp4", "vids/b.mp4", "vids/c.MOV", "vids/d.mp4", "vids/x.mp4")
    touch(outside, "x.mp4", "deep/x.mp4")
    (data / "list.csv").write_text(
        "path,label,source,split,group\n"
        "vids/a real.mp4,REAL,,train,\n"
        "vids/b.mp4,1,vids/a real.mp4,train,\n"        # source as a path
        "vids/c.MOV,fake,vids/a real,,\n"               # source as an id
        "vids/d.mp4,0,,test,people-d\n"
        f"{outside / 'x.mp4'},fake,vids/d,,\n"           # absolute, outside the CSV folder
        "../elsewhere/deep/x.mp4,real,,,\n"             # relative, climbing out
        "vids/x.mp4,FAKE,../elsewhere/deep/x.mp4,val,\n"
        "vids/missing.mp4,real,,,\n", encoding="utf-8")
    d = discover(data / "list.csv")
    assert d.layout == "csv"
    rows = by_id(d)
    up, deep = "elsewhere/x", "elsewhere/deep/x"  # outside the CSV's folder: relative to the folder both share
    assert set(rows) == {"vids/a real", "vids/b", "vids/c", "vids/d", up, deep, "vids/x", "vids/missing"}
    assert rows[up]["path"] == str(outside / "x.mp4") and rows[deep]["path"] == str(outside / "deep" / "x.mp4")
    assert rows["vids/c"]["path"] == str(data / "vids" / "c.MOV")
    assert {v: (r["label"], r["source_id"], r["group"], r["split"]) for v, r in rows.items()} == {
        "vids/a real": ("real", "", "csv:vids/a real", "train"),
        "vids/b": ("fake", "vids/a real", "csv:vids/a real", "train"),
        "vids/c": ("fake", "vids/a real", "csv:vids/a real", ""),
        "vids/d": ("real", "", "csv:people-d", "test"),
        up: ("fake", "vids/d", "csv:people-d", ""),
        deep: ("real", "", f"csv:{deep}", ""),
        "vids/x": ("fake", deep, f"csv:{deep}", "val"),
        "vids/missing": ("real", "", "csv:vids/missing", "")}  # kept: extract fails it, saying why
    assert d.notes == []
    work = tmp_path / "work"
    assert all((work / v).resolve().is_relative_to(work) for v in rows)
    # an id does not depend on the other rows: the same file alone in a list keeps it
    (data / "one.csv").write_text(f"path,label\n{outside / 'x.mp4'},real\n")
    assert [r["video_id"] for r in discover(data / "one.csv").rows] == [up]


def test_csv_source_not_listed_keeps_a_derived_id(tmp_path):
    touch(tmp_path, "f.mp4")
    (tmp_path / "l.csv").write_text("path,label,source\nf.mp4,fake,originals/o.mp4\n")
    d = discover(tmp_path / "l.csv", "csv")
    assert (d.rows[0]["source_id"], d.rows[0]["group"]) == ("originals/o", "csv:originals/o")
    assert d.notes == ["1 fake video(s) have a source that is not on disk (e.g. originals/o)"]


def test_csv_id_that_would_escape_the_workspace_is_rejected(tmp_path):
    touch(tmp_path, "vids/...mp4")  # its stem is '..'
    (tmp_path / "l.csv").write_text("path,label\nvids/...mp4,real\n")
    with pytest.raises(DiscoveryError, match=r"mp4: unsafe video_id 'vids/\.\.'"):
        discover(tmp_path / "l.csv")


def test_a_name_with_a_line_break_is_rejected_in_one_line(tmp_path):
    touch(tmp_path, "real/ok.mp4", "real/bad\nname.mp4")
    with pytest.raises(DiscoveryError) as e:
        discover(tmp_path)
    assert "\n" not in str(e.value) and str(e.value).endswith("the name holds a line break or another control "
                                                              "character; rename it")
    assert "bad\\nname.mp4" in str(e.value)


def test_ids_that_would_share_an_output_folder_are_rejected(tmp_path):
    touch(tmp_path, "a/b.mp4", "a__b.mp4")
    (tmp_path / "l.csv").write_text("path,label\na/b.mp4,real\na__b.mp4,fake\n")
    with pytest.raises(DiscoveryError, match=r"video_ids 'a/b' and 'a__b' would share the output folder 'a__b'"):
        discover(tmp_path / "l.csv")


@pytest.mark.parametrize("text, reason", [
    ("file,label\na.mp4,real\n", "missing column(s) path"),
    ("path,kind\na.mp4,real\n", "missing column(s) label"),
    ("path,label\na.mp4,real\na.mp4,maybe\n", "row 2: label 'maybe' is not real, fake, 0 or 1"),
    ("path,label,split\na.mp4,real,holdout\n", "row 1: split 'holdout' is not train, val, test or empty"),
    ("path,label\na.mp4,real\na.mp4,fake\n", "row 2: 'a.mp4' is the file of row 1"),
    ("path,label\na.mp4,real\nb.mp4,fake\n./a.mp4,fake\n", "row 3: './a.mp4' is the file of row 1"),
    ("", "cannot read as CSV"),
    ("path,label\n", "no videos listed"),
])
def test_csv_bad_input_names_file_and_reason(tmp_path, text, reason):
    touch(tmp_path, "a.mp4")
    (tmp_path / "l.csv").write_text(text)
    with pytest.raises(DiscoveryError) as e:
        discover(tmp_path / "l.csv")
    assert str(e.value).startswith(f"{tmp_path / 'l.csv'}: ") and reason in str(e.value)
    assert "\n" not in str(e.value)


# --- detection and errors ----------------------------------------------------------------------------------

@pytest.mark.parametrize("names, layout", [
    (["manipulated_sequences/Deepfakes/c23/videos/1_2.mp4"], "ffpp"),
    (["part/metadata.json", "part/a.mp4"], "dfdc"),
    (["Celeb-synthesis/id0_id1_0000.mp4"], "celebdf"),
    (["Fake/x.mp4"], "folders"),
])
def test_auto_detects_each_layout(tmp_path, names, layout):
    touch(tmp_path, *names)
    if layout == "dfdc":
        write_metadata(tmp_path / "part", {"a.mp4": {"label": "REAL"}})
    assert discover(tmp_path).layout == layout


def test_auto_and_explicit_errors(tmp_path):
    touch(tmp_path, "videos/a.mp4", "notes.txt")
    with pytest.raises(DiscoveryError, match=f"^{tmp_path}: unknown layout .*pass --dataset$"):
        discover(tmp_path)
    with pytest.raises(DiscoveryError, match="does not exist"):
        discover(tmp_path / "nope")
    with pytest.raises(DiscoveryError, match="unknown dataset 'kinetics'"):
        discover(tmp_path, "kinetics")
    with pytest.raises(DiscoveryError, match="input is a file but not a .csv"):
        discover(tmp_path / "notes.txt")
    with pytest.raises(DiscoveryError, match="dataset 'csv' needs a .csv file"):
        discover(tmp_path, "csv")
    with pytest.raises(DiscoveryError, match=r"no videos found \(ffpp layout\)"):
        discover(tmp_path, "ffpp")


def test_duplicate_ids_are_rejected(tmp_path):
    touch(tmp_path, "real/a.mp4", "real/a.avi")
    with pytest.raises(DiscoveryError, match="video_id 'real/a' is shared by"):
        discover(tmp_path)


def test_discovery_is_deterministic(tmp_path):
    ffpp_tree(tmp_path, ("c23", "c40"))
    first = discover(tmp_path)
    assert discover(str(tmp_path)) == first
    assert [r["video_id"] for r in first.rows] == sorted(r["video_id"] for r in first.rows)


# --- real data in ../shared/data ---------------------------------------------------------------------------

def test_shared_ffpp_c40(shared_data):
    d = discover(shared_data / "ffpp_c40")
    assert d.layout == "ffpp" and len(d.rows) == 50 and d.notes == []
    reals = {r["video_id"] for r in d.rows if r["label"] == "real"}
    fakes = [r for r in d.rows if r["label"] == "fake"]
    assert len(reals) == 10 and len(fakes) == 40
    assert {r["method"] for r in fakes} == {"Deepfakes", "Face2Face", "FaceSwap", "NeuralTextures"}
    assert all(r["source_id"] in reals for r in fakes)
    assert all(Path(r["path"]).is_file() for r in d.rows)
    members: dict[str, set] = {}
    for r in d.rows:
        members.setdefault(r["group"], set()).add(r["video_id"].split("/")[1].split("_")[0])
    assert sorted(map(sorted, members.values())) == [
        ["183", "253"], ["469", "481"], ["585", "599"], ["672", "720"], ["866", "878"]]
    assert all(sum(r["group"] == g for r in d.rows) == 10 for g in members)


def test_shared_dfdc_sample(shared_data):
    d = discover(shared_data / "dfdc_sample")
    assert d.layout == "dfdc"
    assert [(r["video_id"], r["label"], r["source_id"]) for r in d.rows] == [
        ("abofeumbvv", "fake", "atvmxvwyns"), ("abqwwspghj", "fake", "qzimuostzz")]
    assert "2 fake video(s) have a source that is not on disk (e.g. atvmxvwyns)" in d.notes


def test_shared_wild_pairs(shared_data):
    d = discover(shared_data / "wild_pairs")
    assert d.layout == "folders"
    reals = [r for r in d.rows if r["label"] == "real"]
    fakes = [r for r in d.rows if r["label"] == "fake"]
    assert len(reals) == len(fakes) == 6
    assert {r["source_id"].removeprefix("real/Real") for r in fakes} == {
        r["video_id"].removeprefix("fake/Fake") for r in fakes} == {
        "Bateman", "Clinton", "Obama", "Putin", "Reagan", "Taxi"}
    assert all(r["source_id"].removeprefix("real/Real") == r["video_id"].removeprefix("fake/Fake") for r in fakes)
    assert len({r["group"] for r in d.rows}) == 6


def test_csv_ids_outside_the_list_folder_that_come_out_alike_are_refused(tmp_path):
    data, outside = tmp_path / "data", tmp_path / "elsewhere"
    touch(data, "elsewhere/x.mp4")
    touch(outside, "x.mp4")
    (data / "list.csv").write_text("path,label\nelsewhere/x.mp4,real\n../elsewhere/x.mp4,fake\n")
    with pytest.raises(DiscoveryError, match=r"video_id 'elsewhere/x' is shared by .*data/elsewhere/x.mp4 and "
                                             r".*/elsewhere/x.mp4"):
        discover(data / "list.csv")
