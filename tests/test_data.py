"""Training data: text windows, selfgen files, `datasets` datasets, weighted mixtures, collator, errors."""

import json

import pytest
import torch

from qft.testing import SAMPLE_TEXT, tiny_tokenizer
from qft.train.data import Collator, DataConfig, DataConfigError, SourceConfig, build_dataset, mixture_counts


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "train.txt"
    p.write_text(SAMPLE_TEXT)
    return p


def write_selfgen(path, n, seq_len, base=0):
    """A selfgen-format file whose sequences are recognisable: every token of record i is base + i % 50."""
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"idx": i, "input_ids": [base + i % 50] * seq_len, "n_greedy": 3}) + "\n")
    return path


def test_text_windows(tok, text_file):
    ids = tok(SAMPLE_TEXT, add_special_tokens=False).input_ids
    ds, coll = build_dataset(DataConfig(sources=[{"type": "text", "path": str(text_file)}], seq_len=64,
                                        shuffle=False), tok)
    assert len(ds) == len(ids) // 64
    x = ds[1]
    assert x["input_ids"].tolist() == ids[64:128]
    assert torch.equal(x["labels"], x["input_ids"]) and x["attention_mask"].all()
    strided, _ = build_dataset(DataConfig(sources={"type": "text", "path": str(text_file)}, seq_len=64, stride=32), tok)
    assert len(strided) == (len(ids) - 64) // 32 + 1


def test_selfgen_source_truncates_to_seq_len(tok, tmp_path):
    p = write_selfgen(tmp_path / "s.jsonl", 7, 40)
    with open(p, "a") as f:
        f.write('{"idx": 7, "input_ids": [1, 2')  # an interrupted write: dropped with a warning
    with pytest.warns(UserWarning, match="truncated"):
        ds, _ = build_dataset(DataConfig(sources=[{"type": "selfgen", "path": str(p)}], seq_len=32), tok)
    assert len(ds) == 7 and all(len(ds[i]["input_ids"]) == 32 for i in range(7))


def test_mixture_weights_and_determinism(tok, tmp_path, text_file):
    a = write_selfgen(tmp_path / "a.jsonl", 10, 16, base=0)
    b = write_selfgen(tmp_path / "b.jsonl", 30, 16, base=100)
    cfg = DataConfig(sources=[{"type": "selfgen", "path": str(a), "weight": 3},
                              {"type": "selfgen", "path": str(b), "weight": 1}], seq_len=16, num_samples=40, seed=5)
    ds, _ = build_dataset(cfg, tok)
    first = [int(ds[i]["input_ids"][0]) for i in range(len(ds))]
    from_a = [t for t in first if t < 100]
    assert len(ds) == 40 and len(from_a) == 30  # 3:1 of 40; source a (10 records) is cycled 3 times
    assert sorted(set(from_a)) == list(range(10)) and all(from_a.count(t) == 3 for t in range(10))
    again, _ = build_dataset(cfg, tok)
    assert [int(again[i]["input_ids"][0]) for i in range(40)] == first
    other, _ = build_dataset(DataConfig(**{**cfg.__dict__, "seed": 6}), tok)
    assert [int(other[i]["input_ids"][0]) for i in range(40)] != first
    assert mixture_counts([0.5, 0.25, 0.25], 7) == [3, 2, 2]  # largest remainders


def test_hf_dataset_from_disk(tok, tmp_path):
    datasets = pytest.importorskip("datasets")
    docs = ["first document " * 20, "", "second document " * 30]
    datasets.Dataset.from_dict({"content": docs}).save_to_disk(str(tmp_path / "ds"))
    ds, _ = build_dataset(DataConfig(sources=[{"type": "hf", "path": str(tmp_path / "ds"), "text_field": "content"}],
                                     seq_len=32, shuffle=False), tok)
    flat = []
    for d in docs:
        if d:
            flat += tok(d, add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert len(ds) == len(flat) // 32 and ds[0]["input_ids"].tolist() == flat[:32]
    unpacked, _ = build_dataset(DataConfig(sources=[{"type": "hf", "path": str(tmp_path / "ds"), "text_field": "content",
                                                     "pack": False}], seq_len=32, shuffle=False), tok)
    assert len(unpacked) == 2
    pre = tmp_path / "pre"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"input_ids": [[5, 6, 7, 8]] * 3})}).save_to_disk(str(pre))
    ds3, _ = build_dataset(DataConfig(sources=[{"type": "hf", "path": str(pre), "pack": False}], seq_len=8), tok)
    assert len(ds3) == 3 and ds3[0]["input_ids"].tolist() == [5, 6, 7, 8]
    with pytest.raises(DataConfigError, match="text_field='body'"):
        build_dataset(DataConfig(sources=[{"type": "hf", "path": str(tmp_path / "ds"), "text_field": "body"}]), tok)


def test_collator_pads_and_masks():
    items = [{"input_ids": torch.tensor([1, 2, 3])}, {"input_ids": torch.tensor([4, 5])}]
    b = Collator(pad_token_id=9)(items)
    assert b["input_ids"].tolist() == [[1, 2, 3], [4, 5, 9]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert b["labels"].tolist() == [[1, 2, 3], [4, 5, -100]]
    assert Collator(0, pad_to=5)(items)["labels"].shape == (2, 5)


def test_trainer_compatible_batches(tok, text_file):
    ds, coll = build_dataset(DataConfig(sources=[{"type": "text", "path": str(text_file)}], seq_len=32), tok)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=coll)))
    assert set(batch) == {"input_ids", "attention_mask", "labels"} and batch["input_ids"].shape == (4, 32)


@pytest.mark.parametrize("kw, match", [
    (dict(sources=[{"type": "parquet", "path": "x"}]), r"sources\[0\]\.type='parquet'.*selfgen \| text \| hf"),
    (dict(sources=[{"type": "text", "path": "/nonexistent/file.txt"}]), r"sources\[0\]\.path='/nonexistent/file.txt'"),
    (dict(sources=[]), r"DataConfig\.sources=\[\]"),
    (dict(sources=[{"type": "text", "path": "TEXT", "weight": -1}]), r"sources\[0\]\.weight=-1"),
    (dict(sources=[{"type": "text", "path": "TEXT", "weight": 0}]), r"sources\[0\]\.weight=0"),
    (dict(sources=[{"type": "text", "path": "TEXT", "weight": float("nan")}]), r"sources\[0\]\.weight=nan"),
    (dict(sources=[{"type": "text", "path": "TEXT", "wieght": 1}]), r"unknown key\(s\) \['wieght'\]"),
    (dict(sources=[{"type": "text", "path": "TEXT"}], seq_len=1), r"DataConfig\.seq_len=1"),
    (dict(sources=[{"type": "text", "path": "TEXT"}], num_samples=0), r"DataConfig\.num_samples=0"),
])
def test_config_errors_name_the_field(kw, match, text_file):
    for s in kw.get("sources", []):
        if s.get("path") == "TEXT":
            s["path"] = str(text_file)
    with pytest.raises(DataConfigError, match=match):
        DataConfig(**kw)


def test_text_too_short_names_seq_len(tok, tmp_path):
    p = tmp_path / "short.txt"
    p.write_text("only a few words")
    with pytest.raises(DataConfigError, match=r"too short.*DataConfig\.seq_len=256"):
        build_dataset(DataConfig(sources=[SourceConfig(type="text", path=str(p))]), tok)


def test_from_dict_rejects_unknown_keys(text_file):
    with pytest.raises(DataConfigError, match=r"unknown key\(s\) \['seqlen'\]"):
        DataConfig.from_dict({"sources": [{"type": "text", "path": str(text_file)}], "seqlen": 8})
